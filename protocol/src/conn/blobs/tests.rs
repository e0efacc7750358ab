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

#[test]
fn a_chunk_is_read_behind_its_frame_prefix_and_a_shrunk_file_is_an_error() {
    let dir = std::env::temp_dir().join(format!("amity-chunk-read-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("blob");
    let len = CHUNK_SIZE as u64 + 7;
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let faults = ServeFaults::default();
    // Chunk 0, then chunk 1 (7 bytes) from where the first read left the file.
    let first = read_chunk_frame(&mut file, len, 0, faults).unwrap();
    assert_eq!(&first[..5], &frame_prefix(FrameKind::Chunk, CHUNK_SIZE));
    assert_eq!(&first[5..], &data[..CHUNK_SIZE]);
    let last = read_chunk_frame(&mut file, len, 1, faults).unwrap();
    assert_eq!(&last[..5], &frame_prefix(FrameKind::Chunk, 7));
    assert_eq!(&last[5..], &data[CHUNK_SIZE..]);
    // The corrupting fault flips one byte of the payload, never the prefix.
    let mut file = std::fs::File::open(&path).unwrap();
    let corrupt = ServeFaults {
        corrupt_chunk: Some(0),
        ..ServeFaults::default()
    };
    let bad = read_chunk_frame(&mut file, len, 0, corrupt).unwrap();
    assert_eq!(&bad[..5], &first[..5]);
    let flipped = (0..bad.len()).filter(|&i| bad[i] != first[i]).count();
    assert_eq!(flipped, 1);
    // A file cut short after it was hashed: the read says which chunk and by how much.
    std::fs::write(&path, &data[..CHUNK_SIZE / 2]).unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let err = read_chunk_frame(&mut file, len, 0, faults).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    let text = err.to_string();
    assert!(
        text.contains("chunk 0") && text.contains("524288 of 1048576"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
