//! The built-in H.264 path: MP4 (de)muxing with the pure-Rust `mp4` crate and baseline H.264
//! with `openh264` (its C source is bundled, so this works on a machine without FFmpeg).
//!
//! openh264 decodes baseline streams only: ordinary x264 output uses B-frames (main/high
//! profile) and is refused with an error that says to install FFmpeg. Our synthetic corpus is
//! written here as baseline, so it always reads back.

use std::io::{BufReader, Cursor};
use std::path::Path;

use openh264::OpenH264API;
use openh264::decoder::{Decoder, DecoderConfig};
use openh264::encoder::{
    Encoder, EncoderConfig, FrameRate, IntraFramePeriod, QpRange, RateControlMode,
};
use openh264::formats::{RgbSliceU8, YUVBuffer, YUVSource};

use super::CorpusError;
use super::frames::{DecodedVideo, resize_centre_crop};

/// Encodes RGB frames (`frames x height x width x 3`) as a baseline-profile H.264 MP4.
///
/// Width and height must be even (4:2:0). Encoding is single-threaded and deterministic.
pub fn encode_mp4(
    pixels: &[u8],
    width: usize,
    height: usize,
    fps: u32,
    out: &Path,
) -> Result<(), CorpusError> {
    let fail = |reason: String| CorpusError::Encode {
        path: out.to_owned(),
        reason,
    };
    let frame_len = width * height * 3;
    if !width.is_multiple_of(2)
        || !height.is_multiple_of(2)
        || frame_len == 0
        || !pixels.len().is_multiple_of(frame_len)
    {
        return Err(fail(format!(
            "{} bytes are not whole {width}x{height} frames with even sides",
            pixels.len()
        )));
    }
    let config = EncoderConfig::new()
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        // No rate control: a fixed quantiser range keeps the quality (PSNR) predictable
        // whatever the content, and never skips frames.
        .rate_control_mode(RateControlMode::Off)
        .qp(QpRange::new(16, 22))
        .skip_frames(false)
        .intra_frame_period(IntraFramePeriod::from_num_frames(2 * fps))
        .num_threads(1);
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| fail(format!("openh264 encoder: {e}")))?;

    let mut sps = None;
    let mut pps = None;
    let mut samples: Vec<(Vec<u8>, bool)> = Vec::new();
    for frame in pixels.chunks_exact(frame_len) {
        let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(frame, (width, height)));
        let stream = encoder
            .encode(&yuv)
            .map_err(|e| fail(format!("openh264 encode: {e}")))?
            .to_vec();
        // Annex B (start codes) -> AVCC (4-byte lengths); parameter sets go into the track.
        let mut sample = Vec::new();
        let mut sync = false;
        for nal in openh264::nal_units(&stream) {
            let body = strip_start_code(nal);
            let Some(&first) = body.first() else { continue };
            match first & 0x1f {
                7 => sps = sps.or_else(|| Some(body.to_vec())),
                8 => pps = pps.or_else(|| Some(body.to_vec())),
                kind => {
                    sync |= kind == 5;
                    sample.extend_from_slice(&(body.len() as u32).to_be_bytes());
                    sample.extend_from_slice(body);
                }
            }
        }
        if sample.is_empty() {
            return Err(fail("the encoder skipped a frame".into()));
        }
        samples.push((sample, sync));
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err(fail("the encoder produced no parameter sets".into()));
    };

    let brand = |s: &str| s.parse().expect("a four-letter brand");
    let mp4_config = mp4::Mp4Config {
        major_brand: brand("isom"),
        minor_version: 512,
        compatible_brands: vec![brand("isom"), brand("iso2"), brand("avc1"), brand("mp41")],
        timescale: 1000,
    };
    let mut writer = mp4::Mp4Writer::write_start(Cursor::new(Vec::new()), &mp4_config)
        .map_err(|e| fail(e.to_string()))?;
    let track_timescale = fps * 1000;
    writer
        .add_track(&mp4::TrackConfig {
            track_type: mp4::TrackType::Video,
            timescale: track_timescale,
            language: "und".into(),
            media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
                width: width as u16,
                height: height as u16,
                seq_param_set: sps,
                pic_param_set: pps,
            }),
        })
        .map_err(|e| fail(e.to_string()))?;
    for (i, (bytes, is_sync)) in samples.into_iter().enumerate() {
        writer
            .write_sample(
                1,
                &mp4::Mp4Sample {
                    start_time: i as u64 * 1000,
                    duration: 1000,
                    rendering_offset: 0,
                    is_sync,
                    bytes: bytes.into(),
                },
            )
            .map_err(|e| fail(e.to_string()))?;
    }
    writer.write_end().map_err(|e| fail(e.to_string()))?;
    let bytes = writer.into_writer().into_inner();
    std::fs::write(out, bytes).map_err(|source| CorpusError::Io {
        path: out.to_owned(),
        source,
    })
}

fn strip_start_code(nal: &[u8]) -> &[u8] {
    if nal.starts_with(&[0, 0, 0, 1]) {
        &nal[4..]
    } else if nal.starts_with(&[0, 0, 1]) {
        &nal[3..]
    } else {
        nal
    }
}

/// Decodes an MP4 with a baseline H.264 track, resampled to `fps` and `size x size`
/// (short-side resize, centre crop), keeping at most `max_frames` frames.
pub fn decode_mp4(
    path: &Path,
    size: usize,
    fps: f64,
    max_frames: usize,
) -> Result<DecodedVideo, CorpusError> {
    let fail = |reason: String| CorpusError::Decode {
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|source| CorpusError::Io {
        path: path.to_owned(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| CorpusError::Io {
            path: path.to_owned(),
            source,
        })?
        .len();
    let mut reader = mp4::Mp4Reader::read_header(BufReader::new(file), len)
        .map_err(|e| fail(format!("not a readable MP4: {e}")))?;
    let mut video_tracks: Vec<(u32, &mp4::Mp4Track)> = reader
        .tracks()
        .iter()
        .filter(|(_, t)| matches!(t.track_type(), Ok(mp4::TrackType::Video)))
        .map(|(id, t)| (*id, t))
        .collect();
    video_tracks.sort_by_key(|(id, _)| *id);
    let Some(&(track_id, track)) = video_tracks.first() else {
        return Err(fail("no video track".into()));
    };
    match track.media_type() {
        Ok(mp4::MediaType::H264) => {}
        Ok(other) => {
            return Err(fail(format!(
                "{other} video: the built-in decoder reads baseline H.264 only; install FFmpeg"
            )));
        }
        Err(e) => return Err(fail(format!("unknown video codec ({e}); install FFmpeg"))),
    }
    let sps = track
        .sequence_parameter_set()
        .map_err(|e| fail(e.to_string()))?
        .to_vec();
    let pps = track
        .picture_parameter_set()
        .map_err(|e| fail(e.to_string()))?
        .to_vec();
    // profile_idc is the SPS's second byte: 66 = baseline. Main (77) and High (100+) streams
    // may hold B-frames, which openh264 cannot decode.
    if let Some(&profile) = sps.get(1)
        && profile != 66
    {
        return Err(fail(format!(
            "H.264 profile {} (not baseline): the built-in decoder cannot read it; install FFmpeg",
            profile_name(profile)
        )));
    }
    let timescale = track.timescale().max(1) as f64;
    let samples = track.sample_count();
    check_sample_tables(track, samples, len).map_err(fail)?;

    let mut decoder = Decoder::with_api_config(OpenH264API::from_source(), DecoderConfig::new())
        .map_err(|e| fail(format!("openh264 decoder: {e}")))?;
    let mut annex_b = Vec::new();
    for ps in [&sps, &pps] {
        annex_b.extend_from_slice(&[0, 0, 0, 1]);
        annex_b.extend_from_slice(ps);
    }
    decoder
        .decode(&annex_b)
        .map_err(|e| fail(format!("parameter sets: {e}")))?;

    let mut out = Resampler::new(size, fps, max_frames);
    let mut spare = Vec::new();
    let mut end = 0.0;
    for sample_id in 1..=samples {
        if out.full() {
            break;
        }
        let Some(sample) = reader
            .read_sample(track_id, sample_id)
            .map_err(|e| fail(format!("sample {sample_id}: {e}")))?
        else {
            continue;
        };
        let pts = (sample.start_time as f64 + sample.rendering_offset as f64) / timescale;
        end = pts + sample.duration as f64 / timescale;
        if !to_annex_b(&sample.bytes, &mut annex_b) {
            return Err(fail(format!("sample {sample_id}: NAL length past its end")));
        }
        let decoded = decoder.decode(&annex_b).map_err(|e| {
            fail(format!(
                "sample {sample_id}: openh264 cannot decode it ({e}); install FFmpeg"
            ))
        })?;
        if let Some(yuv) = decoded {
            let (w, h) = yuv.dimensions();
            let mut rgb = std::mem::take(&mut spare);
            rgb.resize(w * h * 3, 0);
            yuv.write_rgb8(&mut rgb);
            let frame = image::RgbImage::from_raw(w as u32, h as u32, rgb)
                .expect("a buffer of exactly w*h*3 bytes");
            spare = out.push(pts, frame).unwrap_or_default();
        }
    }
    let video = out.finish(path, end);
    if video.frames == 0 {
        return Err(fail("no frame could be decoded".into()));
    }
    Ok(video)
}

/// The sample tables are the file's word: checks them against each other and the file (of
/// `len` bytes) before trusting them. A timing table shorter than the size table panics the mp4
/// reader; a forged size would have it allocate up to 4 GiB for one sample.
fn check_sample_tables(track: &mp4::Mp4Track, samples: u32, len: u64) -> Result<(), String> {
    let stbl = &track.trak.mdia.minf.stbl;
    if track.trafs.is_empty() {
        let timed: u64 = stbl
            .stts
            .entries
            .iter()
            .map(|e| e.sample_count as u64)
            .sum();
        if timed < samples as u64 {
            return Err(format!(
                "damaged sample tables: {samples} samples, timing for {timed}"
            ));
        }
    }
    let biggest = if stbl.stsz.sample_size > 0 {
        stbl.stsz.sample_size
    } else {
        stbl.stsz.sample_sizes.iter().copied().max().unwrap_or(0)
    };
    if biggest as u64 > len {
        return Err(format!(
            "damaged sample tables: a sample of {biggest} bytes in a file of {len}"
        ));
    }
    Ok(())
}

/// Rewrites an MP4 sample's length-prefixed NAL units as Annex B (start codes) into `out`;
/// `false` when a length runs past the sample's end.
fn to_annex_b(sample: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut rest = sample;
    while rest.len() >= 4 {
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if n > rest.len() - 4 {
            return false;
        }
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(&rest[4..4 + n]);
        rest = &rest[4 + n..];
    }
    true
}

fn profile_name(idc: u8) -> String {
    match idc {
        77 => "main (77)".into(),
        88 => "extended (88)".into(),
        100 => "high (100)".into(),
        110 => "high 10 (110)".into(),
        122 => "high 4:2:2 (122)".into(),
        244 => "high 4:4:4 (244)".into(),
        other => other.to_string(),
    }
}

/// Turns decoded frames with presentation times into frames at a fixed rate: output frame `i`
/// is the latest source frame shown at or before `i / fps` (a frame shown for longer than one
/// output period repeats; frames shown in between are dropped).
///
/// A frame is resized only once an output frame needs it, so frames the resampling drops
/// (two of three when 30 fps becomes 10) are never resized.
struct Resampler {
    size: usize,
    fps: f64,
    max_frames: usize,
    pixels: Vec<u8>,
    frames: usize,
    /// The last frame seen: its time, its pixels, and its resized form once needed.
    last: Option<(f64, image::RgbImage, Option<Vec<u8>>)>,
}

impl Resampler {
    fn new(size: usize, fps: f64, max_frames: usize) -> Self {
        Resampler {
            size,
            fps,
            max_frames,
            pixels: Vec::new(),
            frames: 0,
            last: None,
        }
    }

    fn full(&self) -> bool {
        self.frames >= self.max_frames
    }

    /// Emits the last frame for every output time before `until`.
    fn emit_last_until(&mut self, until: f64) {
        const EPS: f64 = 1e-6;
        let Some((_, img, resized)) = &mut self.last else {
            return;
        };
        while self.frames < self.max_frames && self.frames as f64 / self.fps + EPS < until {
            let r = resized.get_or_insert_with(|| resize_centre_crop(img, self.size));
            self.pixels.extend_from_slice(r);
            self.frames += 1;
        }
    }

    /// Takes the next decoded frame; hands back the previous frame's buffer for reuse.
    fn push(&mut self, pts: f64, frame: image::RgbImage) -> Option<Vec<u8>> {
        self.emit_last_until(pts);
        self.last
            .replace((pts, frame, None))
            .map(|(_, img, _)| img.into_raw())
    }

    /// Flushes the last frame, which is shown until `end` (the stream's end time).
    fn finish(mut self, path: &Path, end: f64) -> DecodedVideo {
        if let Some(&(pts, _, _)) = self.last.as_ref() {
            self.emit_last_until(end.max(pts + 1e-3));
        }
        DecodedVideo {
            source: path.to_owned(),
            size: self.size,
            frames: self.frames,
            pixels: self.pixels,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::synth::{SynthConfig, generate};

    pub(crate) fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let mse = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
    }

    #[test]
    fn synthetic_video_survives_encode_and_builtin_decode() {
        let dir = std::env::temp_dir().join(format!("amity-h264-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.mp4");
        let v = generate(&SynthConfig::for_size(64, 20), 7);
        encode_mp4(&v.pixels, 64, 64, 10, &path).unwrap();
        let back = decode_mp4(&path, 64, 10.0, 1000).unwrap();
        assert_eq!(back.frames, 20);
        let p = psnr(&v.pixels, &back.pixels);
        eprintln!("built-in round trip PSNR {p:.1} dB");
        assert!(p > 30.0, "PSNR {p:.1} dB");
        // Resampling: half the rate keeps every other frame; a cap stops early.
        let half = decode_mp4(&path, 64, 5.0, 1000).unwrap();
        assert_eq!(half.frames, 10);
        assert_eq!(half.frame(3), back.frame(6));
        assert_eq!(decode_mp4(&path, 64, 10.0, 7).unwrap().frames, 7);
        // Downscaling to a preset's size.
        assert_eq!(
            decode_mp4(&path, 32, 10.0, 1000).unwrap().pixels.len(),
            20 * 32 * 32 * 3
        );
        // Deterministic encoding.
        let again = dir.join("w.mp4");
        encode_mp4(&v.pixels, 64, 64, 10, &again).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&again).unwrap()
        );

        std::fs::write(&path, b"not an mp4 at all").unwrap();
        let err = decode_mp4(&path, 64, 10.0, 1000).unwrap_err().to_string();
        assert!(err.contains("v.mp4"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
