//! The conformance suite, written once against the image traits: a script of
//! operations ([`Step`]), the answers an image gives ([`Answer`]), and the doors that
//! run a script: straight through the traits ([`ImageDoor`], the reference), through
//! NBD with libnbd ([`NbdDoor`]) and through a FUSE file ([`FuseDoor`]). Every door
//! runs the same script on an image of the same starting bytes; the answers must be
//! equal, and every read must hold what a byte model of the script predicts.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lazyblk_image::SparseImage;

/// One operation of the script. Offsets and lengths are in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read `len` bytes.
    Read { offset: u64, len: u64 },
    /// Write `len` bytes of [`data`]`(seed)`.
    Write { offset: u64, len: u64, seed: u64 },
    /// Make writes durable (NBD FLUSH, fsync).
    Flush,
    /// Drop a range (NBD TRIM, fallocate PUNCH_HOLE): reads as zeroes after, here.
    Trim { offset: u64, len: u64 },
    /// Zero a range, holes allowed (NBD WRITE_ZEROES, fallocate PUNCH_HOLE).
    Zero { offset: u64, len: u64 },
    /// Zero a range, kept allocated (NBD WRITE_ZEROES + NO_HOLE, fallocate ZERO_RANGE).
    ZeroAllocated { offset: u64, len: u64 },
    /// Which ranges hold data (NBD block status `base:allocation`, SEEK_DATA/SEEK_HOLE).
    DataMap,
}

/// What an image answered to one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Done,
    Bytes(Vec<u8>),
    /// The data ranges, as merged `[start, end)` pairs.
    Map(Vec<(u64, u64)>),
    /// The image refused the change (a read-only image).
    Refused,
    /// Any other failure, with its text (never expected).
    Failed(String),
}

/// The bytes a `Write` of `seed` puts down: a non-repeating pattern, so misplaced
/// bytes show.
pub fn data(len: u64, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i.wrapping_add(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 56) as u8 | 1)
        .collect()
}

/// The script, for an image of `size` bytes (at least 4 MiB): unaligned and aligned
/// writes, trims and zeroes inside and across 4 KiB blocks, the last bytes of the
/// image, and a data map before, between and after.
pub fn script(size: u64) -> Vec<Step> {
    const K: u64 = 1024;
    const M: u64 = 1024 * K;
    let end = size;
    vec![
        Step::DataMap,
        // A large read of holes (over MemImages: sent as a hole chunk, not copied).
        Step::Read {
            offset: 512 * K,
            len: 256 * K,
        },
        Step::Read { offset: 0, len: M },
        Step::Write {
            offset: 3 * 4096 + 100,
            len: 10_000,
            seed: 1,
        },
        Step::Read {
            offset: 0,
            len: 64 * K,
        },
        Step::Write {
            offset: M,
            len: 256 * K,
            seed: 2,
        },
        Step::Flush,
        Step::DataMap,
        Step::Trim {
            offset: M + 64 * K,
            len: 64 * K,
        },
        Step::Read {
            offset: M,
            len: 256 * K,
        },
        Step::Zero {
            offset: 3 * 4096 + 2100,
            len: 5000,
        },
        Step::Read {
            offset: 0,
            len: 64 * K,
        },
        Step::Zero {
            offset: M + 192 * K,
            len: 32 * K,
        },
        Step::ZeroAllocated {
            offset: M + 128 * K,
            len: 32 * K,
        },
        Step::DataMap,
        Step::Read {
            offset: M,
            len: 256 * K,
        },
        Step::Write {
            offset: 2 * M + 4000,
            len: 200 * K,
            seed: 3,
        },
        Step::Read {
            offset: 512 * K,
            len: 2 * M,
        },
        Step::Read {
            offset: end - 64 * K,
            len: 64 * K,
        },
        Step::Write {
            offset: end - 512,
            len: 512,
            seed: 4,
        },
        Step::Read {
            offset: end - 4096,
            len: 4096,
        },
        Step::Zero {
            offset: end - 8192,
            len: 8192,
        },
        Step::Read {
            offset: end - 16 * K,
            len: 16 * K,
        },
        Step::Flush,
        Step::DataMap,
    ]
}

/// The read-only script: reads and the data map give answers, every change is refused.
pub fn read_only_script(size: u64) -> Vec<Step> {
    vec![
        Step::DataMap,
        Step::Read {
            offset: 0,
            len: 1 << 20,
        },
        Step::Read {
            offset: size - 8192,
            len: 8192,
        },
        Step::Write {
            offset: 0,
            len: 512,
            seed: 9,
        },
        Step::Zero {
            offset: 0,
            len: 4096,
        },
        Step::Read {
            offset: 0,
            len: 4096,
        },
        Step::DataMap,
    ]
}

/// Checks `answers` (of `steps`, over an image that started as `start`) against a
/// byte model: every read holds the bytes written, zeroed or started with, and every
/// data map covers what was last written and leaves out the whole blocks just trimmed.
pub fn check_model(start: &[u8], steps: &[Step], answers: &[Answer], writable: bool) {
    assert_eq!(steps.len(), answers.len());
    let mut model = start.to_vec();
    let mut written: Vec<(u64, u64)> = Vec::new();
    let mut trimmed: Vec<(u64, u64)> = Vec::new();
    for (i, (step, answer)) in steps.iter().zip(answers).enumerate() {
        match *step {
            Step::Read { offset, len } => {
                let want = &model[offset as usize..(offset + len) as usize];
                let Answer::Bytes(got) = answer else {
                    panic!("step {i} {step:?}: {answer:?}");
                };
                assert!(
                    got == want,
                    "step {i} {step:?}: bytes differ from the model"
                );
            }
            Step::Write { offset, len, seed } if writable => {
                assert_eq!(answer, &Answer::Done, "step {i} {step:?}");
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data(len, seed));
                written.retain(|&(s, e)| e <= offset || s >= offset + len);
                written.push((offset, offset + len));
                trimmed.retain(|&(s, e)| e <= offset || s >= offset + len);
            }
            Step::Trim { offset, len }
            | Step::Zero { offset, len }
            | Step::ZeroAllocated { offset, len }
                if writable =>
            {
                assert_eq!(answer, &Answer::Done, "step {i} {step:?}");
                model[offset as usize..(offset + len) as usize].fill(0);
                written.retain(|&(s, e)| e <= offset || s >= offset + len);
                if !matches!(step, Step::ZeroAllocated { .. }) {
                    trimmed.push((offset.next_multiple_of(4096), (offset + len) / 4096 * 4096));
                }
            }
            Step::Write { .. }
            | Step::Trim { .. }
            | Step::Zero { .. }
            | Step::ZeroAllocated { .. } => {
                assert_eq!(answer, &Answer::Refused, "step {i} {step:?}");
            }
            Step::Flush => assert_eq!(answer, &Answer::Done, "step {i} {step:?}"),
            Step::DataMap => {
                let Answer::Map(map) = answer else {
                    panic!("step {i} {step:?}: {answer:?}");
                };
                let covered = |s: u64, e: u64| map.iter().any(|&(ms, me)| ms <= s && e <= me);
                let touches = |s: u64, e: u64| map.iter().any(|&(ms, me)| ms < e && s < me);
                for &(s, e) in &written {
                    assert!(
                        covered(s, e),
                        "step {i}: written [{s}, {e}) not data in {map:?}"
                    );
                }
                for &(s, e) in trimmed.iter().filter(|(s, e)| s < e) {
                    assert!(
                        !touches(s, e),
                        "step {i}: trimmed [{s}, {e}) is data in {map:?}"
                    );
                }
            }
        }
    }
}

/// Asserts two doors gave the same answers, naming the first step that differs.
pub fn assert_same(steps: &[Step], a: (&str, &[Answer]), b: (&str, &[Answer])) {
    assert_eq!(a.1.len(), b.1.len());
    for (i, step) in steps.iter().enumerate() {
        let (x, y) = (&a.1[i], &b.1[i]);
        if x != y {
            let show = |answer: &Answer| match answer {
                Answer::Bytes(bytes) => format!("{} bytes", bytes.len()),
                other => format!("{other:?}"),
            };
            panic!(
                "step {i} {step:?}: {} answered {}, {} answered {}",
                a.0,
                show(x),
                b.0,
                show(y)
            );
        }
    }
}

/// Merges touching `[start, end)` ranges.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|(s, e)| s < e);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The reference: the script run straight through the image traits.
pub struct ImageDoor<'a, I>(pub &'a I);

impl<I: SparseImage> ImageDoor<'_, I> {
    pub async fn run(&self, steps: &[Step]) -> Vec<Answer> {
        let image = self.0;
        let mut answers = Vec::new();
        for step in steps {
            let done = |r: io::Result<()>| match r {
                Ok(()) => Answer::Done,
                Err(_) if !image.writable() => Answer::Refused,
                Err(e) => Answer::Failed(e.to_string()),
            };
            answers.push(match *step {
                Step::Read { offset, len } => {
                    let mut buf = vec![0; len as usize];
                    match image.read_at(offset, &mut buf).await {
                        Ok(()) => Answer::Bytes(buf),
                        Err(e) => Answer::Failed(e.to_string()),
                    }
                }
                Step::Write { offset, len, seed } => {
                    done(image.write_at(offset, &data(len, seed), false).await)
                }
                Step::Flush => done(image.flush().await),
                Step::Trim { offset, len } => done(image.trim(offset, len, false).await),
                Step::Zero { offset, len } => done(image.write_zeroes(offset, len, false).await),
                Step::ZeroAllocated { offset, len } => {
                    done(image.write_zeroes_allocated(offset, len, false).await)
                }
                Step::DataMap => match image.extents(0, image.size()).await {
                    Ok(extents) => {
                        let mut pos = 0;
                        let mut ranges = Vec::new();
                        for extent in extents {
                            if !extent.hole {
                                ranges.push((pos, pos + extent.length));
                            }
                            pos += extent.length;
                        }
                        Answer::Map(merged(ranges))
                    }
                    Err(e) => Answer::Failed(e.to_string()),
                },
            });
        }
        answers
    }
}

/// The script run over NBD by libnbd (Python bindings), one connection for all of it.
/// Write data comes from files the test writes, so the bytes are the suite's own.
pub struct NbdDoor {
    pub uri: String,
    /// Where the script's write data is put for Python to read.
    pub scratch: PathBuf,
}

/// The Python side of [`NbdDoor`]: one JSON line per step.
const NBD_RUNNER: &str = r#"
import errno, json, sys, nbd
uri, steps = sys.argv[1], json.load(open(sys.argv[2]))
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
out = open(sys.argv[3], "wb")
def refused(e, kind):
    # libnbd refuses a change to a read-only export itself (EPERM, or EINVAL for an
    # operation the server does not offer on it).
    changes = kind in ("write", "trim", "zero", "zero_allocated")
    return e.errnum in (errno.EPERM, errno.EROFS, errno.EACCES) or (changes and h.is_read_only())
for step in steps:
    kind = step["kind"]
    try:
        if kind == "read":
            data = h.pread(step["len"], step["offset"])
            out.write(b"B" + len(data).to_bytes(8, "big") + data)
            continue
        elif kind == "write":
            h.pwrite(open(step["file"], "rb").read(), step["offset"])
        elif kind == "flush":
            h.flush()
        elif kind == "trim":
            h.trim(step["len"], step["offset"])
        elif kind == "zero":
            h.zero(step["len"], step["offset"])
        elif kind == "zero_allocated":
            h.zero(step["len"], step["offset"], flags=nbd.CMD_FLAG_NO_HOLE)
        elif kind == "map":
            ranges, pos = [], 0
            while pos < size:
                got = []
                def extents(context, offset, entries, err):
                    if context == nbd.CONTEXT_BASE_ALLOCATION:
                        got.extend(entries)
                    return 0
                h.block_status(min(size - pos, 1 << 30), pos, extents)
                if not got:
                    raise RuntimeError("no extents at %d" % pos)
                for i in range(0, len(got), 2):
                    length, flags = got[i], got[i + 1]
                    length = min(length, size - pos)
                    if not flags & nbd.STATE_HOLE:
                        ranges.append([pos, pos + length])
                    pos += length
                    if pos >= size:
                        break
            line = json.dumps(ranges).encode()
            out.write(b"M" + len(line).to_bytes(8, "big") + line)
            continue
        out.write(b"D" + (0).to_bytes(8, "big"))
    except nbd.Error as e:
        code = b"R" if refused(e, kind) else b"F"
        text = str(e).encode()
        out.write(code + len(text).to_bytes(8, "big") + text)
out.close()
h.shutdown()
"#;

impl NbdDoor {
    pub fn run(&self, steps: &[Step]) -> Vec<Answer> {
        std::fs::create_dir_all(&self.scratch).expect("scratch dir");
        let mut json = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            json.push(match *step {
                Step::Read { offset, len } => {
                    serde_json::json!({"kind": "read", "offset": offset, "len": len})
                }
                Step::Write { offset, len, seed } => {
                    let file = self.scratch.join(format!("write-{i}"));
                    std::fs::write(&file, data(len, seed)).expect("write data");
                    serde_json::json!({"kind": "write", "offset": offset, "file": file})
                }
                Step::Flush => serde_json::json!({"kind": "flush"}),
                Step::Trim { offset, len } => {
                    serde_json::json!({"kind": "trim", "offset": offset, "len": len})
                }
                Step::Zero { offset, len } => {
                    serde_json::json!({"kind": "zero", "offset": offset, "len": len})
                }
                Step::ZeroAllocated { offset, len } => {
                    serde_json::json!({"kind": "zero_allocated", "offset": offset, "len": len})
                }
                Step::DataMap => serde_json::json!({"kind": "map"}),
            });
        }
        let steps_file = self.scratch.join("steps.json");
        let answers_file = self.scratch.join("answers");
        std::fs::write(&steps_file, serde_json::to_vec(&json).expect("json")).expect("steps");
        // The system Python has the `nbd` module (one earlier on PATH may not).
        let out = Command::new("/usr/bin/python3")
            .args(["-c", NBD_RUNNER, &self.uri])
            .arg(&steps_file)
            .arg(&answers_file)
            .stdin(Stdio::null())
            .output()
            .expect("running python3 with libnbd");
        assert!(
            out.status.success(),
            "libnbd script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let raw = std::fs::read(&answers_file).expect("answers");
        let mut answers = Vec::new();
        let mut at = 0;
        while at < raw.len() {
            let kind = raw[at];
            let len = u64::from_be_bytes(raw[at + 1..at + 9].try_into().expect("8 bytes")) as usize;
            let body = raw[at + 9..at + 9 + len].to_vec();
            at += 9 + len;
            answers.push(match kind {
                b'B' => Answer::Bytes(body),
                b'D' => Answer::Done,
                b'R' => Answer::Refused,
                b'M' => {
                    let ranges: Vec<(u64, u64)> = serde_json::from_slice(&body).expect("map");
                    Answer::Map(merged(ranges))
                }
                _ => Answer::Failed(String::from_utf8_lossy(&body).into_owned()),
            });
        }
        answers
    }
}

/// The script run on a file of the FUSE mount: pread, pwrite, fsync,
/// fallocate(PUNCH_HOLE | KEEP_SIZE) for trims and zeroes, fallocate(ZERO_RANGE) for
/// allocated zeroes, and SEEK_DATA / SEEK_HOLE for the data map.
pub struct FuseDoor {
    pub path: PathBuf,
}

fn errno_answer(e: io::Error) -> Answer {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EROFS | libc::EACCES | libc::EBADF) => Answer::Refused,
        _ => Answer::Failed(e.to_string()),
    }
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// lseek(SEEK_DATA / SEEK_HOLE); `None` for ENXIO (no data past `offset`).
fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on an open descriptor.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

fn data_map(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(start) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(size);
        assert!(end > start, "SEEK_HOLE from data at {start} answered {end}");
        ranges.push((start, end));
        pos = end;
    }
    Ok(merged(ranges))
}

impl FuseDoor {
    pub fn run(&self, steps: &[Step]) -> Vec<Answer> {
        let (file, writable) = match OpenOptions::new().read(true).write(true).open(&self.path) {
            Ok(file) => (file, true),
            Err(e)
                if e.raw_os_error() == Some(libc::EROFS)
                    || e.raw_os_error() == Some(libc::EACCES) =>
            {
                (File::open(&self.path).expect("opening read-only"), false)
            }
            Err(e) => panic!("opening {}: {e}", self.path.display()),
        };
        let size = file.metadata().expect("metadata").len();
        let change = |r: io::Result<()>| match r {
            Ok(()) => Answer::Done,
            Err(e) => errno_answer(e),
        };
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let mut answers = Vec::new();
        for step in steps {
            answers.push(match *step {
                Step::Read { offset, len } => {
                    let mut buf = vec![0; len as usize];
                    match file.read_exact_at(&mut buf, offset) {
                        Ok(()) => Answer::Bytes(buf),
                        Err(e) => Answer::Failed(e.to_string()),
                    }
                }
                Step::Write { .. }
                | Step::Trim { .. }
                | Step::Zero { .. }
                | Step::ZeroAllocated { .. }
                    if !writable =>
                {
                    Answer::Refused
                }
                Step::Write { offset, len, seed } => {
                    change(file.write_all_at(&data(len, seed), offset))
                }
                Step::Flush => change(file.sync_all()),
                Step::Trim { offset, len } | Step::Zero { offset, len } => {
                    change(fallocate(&file, punch, offset, len))
                }
                Step::ZeroAllocated { offset, len } => {
                    change(fallocate(&file, libc::FALLOC_FL_ZERO_RANGE, offset, len))
                }
                Step::DataMap => match data_map(&file, size) {
                    Ok(map) => Answer::Map(map),
                    Err(e) => Answer::Failed(e.to_string()),
                },
            });
        }
        answers
    }
}

/// Whether FUSE can be mounted here (root and /dev/fuse); says why not.
pub fn fuse_usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0;
    if !ok {
        eprintln!("skipping: needs root and /dev/fuse");
    }
    ok
}
