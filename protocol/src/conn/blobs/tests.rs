use super::*;

#[test]
fn concurrent_requests_for_one_blob_hash_it_once() {
    let dir = std::env::temp_dir().join(format!("amity-outboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("blob");
    let data: Vec<u8> = (0..4 * CHUNK_SIZE + 5).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let id = BlobId::of(&data);
    let cache = OutboardCache::new();
    let start = std::sync::Barrier::new(8);
    let outboards: Vec<std::sync::Arc<Outboard>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    cache.outboard(&path, &id).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(cache.hashed(), 1, "eight requests at once, one hashing");
    assert!(
        outboards
            .iter()
            .all(|o| o.chunks.len() == 5 && o.len == data.len() as u64)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
