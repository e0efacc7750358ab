//! Decoding video files to RGB frames at a preset's frame rate and size.
//!
//! Two decoders:
//! - **FFmpeg**, the `ffmpeg` command-line tool as a subprocess (found on `PATH`, or at
//!   `$AMITY_FFMPEG`): reads every container and codec FFmpeg knows (MP4, WebM, MKV, AVI, ...),
//!   resamples the frame rate (`fps` filter), resizes the short side and centre-crops
//!   (`scale` + `crop`), and pipes raw RGB to us. No build-time dependency and no linking
//!   against a particular libav* version; Debian's FFmpeg 5.1 decodes 720p to 128 px at about 480
//!   frames/s per core, far faster than training consumes clips.
//! - **Built-in** ([`super::h264`]): MP4 + baseline H.264 without any system package.
//!
//! `Auto` decodes MP4s the built-in path can read in-process and hands everything else to
//! FFmpeg (when installed). Decoders differ slightly in their colour conversion, so shard ids
//! are reproducible for the same input *and* the same decoder choice.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::CorpusError;
use super::frames::DecodedVideo;
use super::h264;

/// Which decoder reads video files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecoderChoice {
    /// FFmpeg when installed, else the built-in decoder.
    #[default]
    Auto,
    /// Always FFmpeg (an error if it is missing).
    Ffmpeg,
    /// Always the built-in MP4 + baseline H.264 decoder.
    Builtin,
}

impl std::str::FromStr for DecoderChoice {
    type Err = crate::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DecoderChoice::Auto),
            "ffmpeg" => Ok(DecoderChoice::Ffmpeg),
            "builtin" => Ok(DecoderChoice::Builtin),
            other => Err(crate::UnknownName {
                what: "decoder",
                got: other.to_owned(),
                expected: &["auto", "ffmpeg", "builtin"],
            }),
        }
    }
}

/// File extensions treated as videos.
pub const VIDEO_EXTENSIONS: [&str; 12] = [
    "mp4", "m4v", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "ts", "flv", "ogv", "wmv",
];

/// Whether `path` names a video file (by extension).
pub fn is_video_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e.as_str()))
}

/// The FFmpeg binary to run: `$AMITY_FFMPEG` or `ffmpeg`.
pub fn ffmpeg_program() -> PathBuf {
    std::env::var_os("AMITY_FFMPEG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("ffmpeg"))
}

/// FFmpeg's version line, if FFmpeg runs (checked once per process).
pub fn ffmpeg_version() -> Option<&'static str> {
    static VERSION: OnceLock<Option<String>> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let out = Command::new(ffmpeg_program())
                .arg("-version")
                .output()
                .ok()?;
            out.status.success().then(|| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .unwrap_or("ffmpeg")
                    .to_owned()
            })
        })
        .as_deref()
}

/// How a video is to be decoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeTarget {
    /// Output side in pixels (short-side resize, centre crop).
    pub size: usize,
    /// Output frame rate.
    pub fps: f64,
    /// Frames kept at most.
    pub max_frames: usize,
}

/// Decodes a video file with the chosen decoder.
pub fn decode_video(
    path: &Path,
    target: DecodeTarget,
    choice: DecoderChoice,
) -> Result<DecodedVideo, CorpusError> {
    let is_mp4 = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .is_some_and(|e| matches!(e.as_str(), "mp4" | "m4v" | "mov"));
    let builtin = || {
        if !is_mp4 {
            return Err(CorpusError::Decode {
                path: path.to_owned(),
                reason: "the built-in decoder reads MP4 (baseline H.264) only; install FFmpeg \
                         for other containers"
                    .into(),
            });
        }
        h264::decode_mp4(path, target.size, target.fps, target.max_frames)
    };
    match choice {
        DecoderChoice::Builtin => builtin(),
        DecoderChoice::Ffmpeg => {
            if ffmpeg_version().is_none() {
                return Err(CorpusError::Decode {
                    path: path.to_owned(),
                    reason: format!(
                        "the FFmpeg decoder was asked for, but `{}` does not run; install FFmpeg \
                         (Debian/Ubuntu: apt-get install ffmpeg) or set AMITY_FFMPEG",
                        ffmpeg_program().display()
                    ),
                });
            }
            decode_ffmpeg(path, target)
        }
        // Baseline MP4s decode in-process (no process start per file: ten times faster on
        // short clips); everything else, or anything the built-in path refuses, goes to FFmpeg.
        DecoderChoice::Auto => match (is_mp4, ffmpeg_version()) {
            (_, None) => builtin(),
            (false, Some(_)) => decode_ffmpeg(path, target),
            (true, Some(_)) => builtin().or_else(|_| decode_ffmpeg(path, target)),
        },
    }
}

/// The longest one FFmpeg decode may take before it is killed (a file built to make it spin).
pub const FFMPEG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The most bytes of FFmpeg's error output kept (only its last line is reported).
const STDERR_LIMIT: u64 = 64 << 10;

/// Runs `cmd` to completion like [`Command::output`], but kills it after `limit` (then fails
/// with `TimedOut`) and keeps at most [`STDERR_LIMIT`] bytes of its error output.
fn output_within(
    mut cmd: Command,
    limit: std::time::Duration,
) -> std::io::Result<std::process::Output> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).map(|_| buf)
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut limited = stderr.take(STDERR_LIMIT);
        let _ = limited.read_to_end(&mut buf);
        // Drain the rest so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
        buf
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("killed after {} s", limit.as_secs()),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stdout = out_reader
        .join()
        .map_err(|_| std::io::Error::other("stdout reader panicked"))??;
    let stderr = err_reader.join().unwrap_or_default();
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// The FFmpeg filter chain that brings a video to `target`: its frame rate, then scaled so the
/// short side is `size` (bilinear) and centre-cropped square. `amity bench ingest` runs the same
/// chain in its `ffmpeg` baseline.
pub fn ffmpeg_filter(target: DecodeTarget) -> String {
    let s = target.size;
    format!(
        "fps={fps},scale={s}:{s}:force_original_aspect_ratio=increase:flags=bilinear,crop={s}:{s}",
        fps = target.fps
    )
}

/// Decodes through the `ffmpeg` tool, piping raw RGB frames.
pub fn decode_ffmpeg(path: &Path, target: DecodeTarget) -> Result<DecodedVideo, CorpusError> {
    let s = target.size;
    let filter = ffmpeg_filter(target);
    // The input is named as a `file:` URL and only the file protocol is allowed, so a name or
    // a playlist inside the file cannot make FFmpeg open the network or other files.
    let mut input = std::ffi::OsString::from("file:");
    input.push(path.as_os_str());
    let mut cmd = Command::new(ffmpeg_program());
    cmd.args([
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-threads",
        "1",
        "-protocol_whitelist",
        "file",
    ])
    .arg("-i")
    .arg(&input)
    .args(["-map", "0:v:0", "-an", "-sn", "-vf", &filter])
    .args(["-frames:v", &target.max_frames.to_string()])
    .args(["-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"]);
    let out = output_within(cmd, FFMPEG_TIMEOUT).map_err(|source| CorpusError::Decode {
        path: path.to_owned(),
        reason: format!("cannot run `{}`: {source}", ffmpeg_program().display()),
    })?;
    let frame = s * s * 3;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message")
            .trim()
            .to_owned();
        return Err(CorpusError::Decode {
            path: path.to_owned(),
            reason: format!("ffmpeg failed ({}): {reason}", out.status),
        });
    }
    if out.stdout.is_empty() || out.stdout.len() % frame != 0 {
        return Err(CorpusError::Decode {
            path: path.to_owned(),
            reason: format!(
                "ffmpeg gave {} bytes, not whole {s}x{s} RGB frames",
                out.stdout.len()
            ),
        });
    }
    Ok(DecodedVideo {
        source: path.to_owned(),
        size: s,
        frames: out.stdout.len() / frame,
        pixels: out.stdout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security review L4: a decoder that hangs is killed, and its error output is bounded.
    #[cfg(unix)]
    #[test]
    fn a_hung_decoder_is_killed_and_its_chatter_bounded() {
        let mut sleep = Command::new("sh");
        sleep.args(["-c", "sleep 30"]);
        let start = std::time::Instant::now();
        let err = output_within(sleep, std::time::Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        let mut chatty = Command::new("sh");
        chatty.args(["-c", "head -c 1000000 /dev/zero >&2; printf done"]);
        let out = output_within(chatty, std::time::Duration::from_secs(30)).unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"done");
        assert_eq!(out.stderr.len() as u64, STDERR_LIMIT);
    }

    #[test]
    fn choices_parse_and_extensions_are_recognised() {
        assert_eq!("auto".parse::<DecoderChoice>(), Ok(DecoderChoice::Auto));
        assert!("gstreamer".parse::<DecoderChoice>().is_err());
        assert!(is_video_file(Path::new("a/b.MP4")));
        assert!(is_video_file(Path::new("x.webm")));
        assert!(!is_video_file(Path::new("x.labels.json")));
    }

    #[test]
    fn builtin_refuses_other_containers_with_advice() {
        let err = decode_video(
            Path::new("clip.webm"),
            DecodeTarget {
                size: 32,
                fps: 10.0,
                max_frames: 10,
            },
            DecoderChoice::Builtin,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("clip.webm") && err.contains("install FFmpeg"),
            "{err}"
        );
    }

    #[test]
    fn ffmpeg_reads_our_mp4_back_within_codec_error() {
        if ffmpeg_version().is_none() {
            assert!(
                std::env::var_os("AMITY_REQUIRE_FFMPEG").is_none(),
                "AMITY_REQUIRE_FFMPEG is set but ffmpeg does not run"
            );
            eprintln!("ffmpeg not installed: FFmpeg path not checked");
            return;
        }
        use crate::data::synth::{SynthConfig, generate};
        let dir = std::env::temp_dir().join(format!("amity-ffmpeg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.mp4");
        let v = generate(&SynthConfig::for_size(64, 20), 3);
        h264::encode_mp4(&v.pixels, 64, 64, 10, &path).unwrap();
        let target = DecodeTarget {
            size: 64,
            fps: 10.0,
            max_frames: 1000,
        };
        let back = decode_video(&path, target, DecoderChoice::Ffmpeg).unwrap();
        assert_eq!(back.frames, 20);
        let p = h264::tests::psnr(&v.pixels, &back.pixels);
        eprintln!("FFmpeg path PSNR {p:.1} dB");
        // FFmpeg's YUV->RGB conversion differs a little from openh264's.
        assert!(p > 28.0, "PSNR {p:.1} dB");
        let builtin = decode_video(&path, target, DecoderChoice::Builtin).unwrap();
        let p2 = h264::tests::psnr(&builtin.pixels, &back.pixels);
        assert!(p2 > 30.0, "the two decoders agree: PSNR {p2:.1} dB");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
