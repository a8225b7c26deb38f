//! Issue 24's fault "a read on a frontend for an image deleted meanwhile": clients hold
//! a sandbox and its template open through NBD (libnbd) and FUSE (an open file) while
//! the sandbox is deleted (`overlay delete --force`), the template is evicted from the
//! node (`evict --force`) and deleted from the store (`delete` then `gc --grace 0s`).
//! Every read and write the clients send afterwards is answered with the right bytes
//! or a clear error (an NBD error, EIO) inside the kernel NBD client's timeout: never
//! a hang, never wrong bytes, and the daemon keeps serving its other images.

mod support;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::node::DaemonProc;
use support::{manifest_json, pattern, publish, run, StoreProc};

/// The kernel NBD client's request timeout: an answer later than this is a hang to a
/// guest (its device is declared dead). Every request here must be answered before.
const KERNEL_NBD_TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon's budget per demand read: short, so a read of a chunk no source holds
/// any more fails well inside [`KERNEL_NBD_TIMEOUT`] on a loaded machine.
const READ_DEADLINE: &str = "5";

/// Chunk size the templates are published with (publish's default).
const CHUNK: usize = 1 << 20;

/// Size of each template: a few chunks, so a sandbox has written and unwritten ones.
const TEMPLATE_SIZE: usize = 8 * CHUNK;

/// What a client got back for one request.
#[derive(PartialEq, Eq)]
enum Reply {
    Bytes(Vec<u8>),
    Done,
    /// A clear error: the NBD error (or errno) the client saw, with its text.
    Error(String),
}

/// Bytes by their length only: a failed assertion's message stays readable.
impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Bytes(b) => write!(f, "{} bytes", b.len()),
            Reply::Done => write!(f, "done"),
            Reply::Error(e) => write!(f, "error {e}"),
        }
    }
}

/// A long-lived libnbd connection driven a line at a time, so a request can be sent
/// after the image it is connected to was deleted.
struct NbdClient {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

/// The client: reads `read LEN OFF`, `write OFF HEX`, `flush` lines and answers each
/// with `bytes HEX`, `done` or `error ERRNO TEXT`.
const CLIENT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("ready", h.get_size(), flush=True)
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] == "read":
            print("bytes", h.pread(int(cmd[1]), int(cmd[2])).hex(), flush=True)
        elif cmd[0] == "write":
            h.pwrite(bytes.fromhex(cmd[2]), int(cmd[1]))
            print("done", flush=True)
        elif cmd[0] == "flush":
            h.flush()
            print("done", flush=True)
    except nbd.Error as e:
        print("error", e.errnum, str(e).replace("\n", " "), flush=True)
"#;

impl NbdClient {
    fn connect(uri: &str) -> NbdClient {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", CLIENT, uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with libnbd's nbd module (scripts/setup.sh)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut client = NbdClient {
            child,
            stdin,
            lines,
        };
        let ready = client.answer(&format!("connecting to {uri}"));
        assert!(ready.starts_with("ready "), "{uri}: {ready}");
        client
    }

    /// The next answer line, which must come within the kernel's timeout.
    fn answer(&mut self, what: &str) -> String {
        self.lines
            .recv_timeout(KERNEL_NBD_TIMEOUT)
            .unwrap_or_else(|_| {
                panic!("{what}: no answer within {KERNEL_NBD_TIMEOUT:?} (a hang to a guest)")
            })
    }

    fn send(&mut self, line: &str, what: &str) -> Reply {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let got = self.answer(what);
        if let Some(hex) = got.strip_prefix("bytes ") {
            Reply::Bytes(unhex(hex))
        } else if got == "done" {
            Reply::Done
        } else if let Some(error) = got.strip_prefix("error ") {
            Reply::Error(error.to_string())
        } else {
            panic!("{what}: unexpected answer {got:?}")
        }
    }

    fn read(&mut self, offset: usize, len: usize) -> Reply {
        self.send(
            &format!("read {len} {offset}"),
            &format!("NBD read of {len} at {offset}"),
        )
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> Reply {
        let line = format!("write {offset} {}", hex(data));
        self.send(&line, &format!("NBD write at {offset}"))
    }

    fn flush(&mut self) -> Reply {
        self.send("flush", "NBD flush")
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An open FUSE file whose requests run on a thread, each answered within the
/// kernel's timeout (a hung FUSE request would block the test thread for good).
struct FuseClient {
    file: Arc<File>,
    path: PathBuf,
}

impl FuseClient {
    fn open(path: &Path, write: bool) -> FuseClient {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        FuseClient {
            file: Arc::new(file),
            path: path.to_path_buf(),
        }
    }

    fn run(
        &self,
        what: String,
        op: impl FnOnce(&File) -> std::io::Result<Reply> + Send + 'static,
    ) -> Reply {
        let (tx, rx) = mpsc::channel();
        let file = self.file.clone();
        std::thread::spawn(move || {
            let _ = tx.send(op(&file));
        });
        let what = format!("FUSE {what} on {}", self.path.display());
        match rx.recv_timeout(KERNEL_NBD_TIMEOUT) {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => Reply::Error(format!("{} {e}", e.raw_os_error().unwrap_or(0))),
            Err(_) => panic!("{what}: no answer within {KERNEL_NBD_TIMEOUT:?} (a hang)"),
        }
    }

    fn read(&self, offset: usize, len: usize) -> Reply {
        self.run(format!("read of {len} at {offset}"), move |f| {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, offset as u64)?;
            Ok(Reply::Bytes(buf))
        })
    }

    fn write(&self, offset: usize, data: &[u8]) -> Reply {
        let data = data.to_vec();
        self.run(format!("write at {offset}"), move |f| {
            f.write_all_at(&data, offset as u64)?;
            Ok(Reply::Done)
        })
    }

    fn fsync(&self) -> Reply {
        self.run("fsync".into(), |f| f.sync_all().map(|()| Reply::Done))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// The read answered with exactly `want`, else panics naming `what`.
fn assert_bytes(got: Reply, want: &[u8], what: &str) {
    match got {
        Reply::Bytes(b) => assert!(b == want, "{what}: WRONG bytes served"),
        other => panic!("{what}: expected the bytes, got {other:?}"),
    }
}

/// The request answered with the right bytes or a clear error, never other bytes.
fn assert_right_or_error(got: Reply, want: &[u8], what: &str) -> bool {
    match got {
        Reply::Bytes(b) => {
            assert!(b == want, "{what}: WRONG bytes served");
            true
        }
        Reply::Error(e) => {
            assert!(!e.trim().is_empty(), "{what}: an error without a cause");
            false
        }
        Reply::Done => panic!("{what}: a read answered without bytes"),
    }
}

fn assert_error(got: Reply, what: &str) {
    match got {
        Reply::Error(e) => {
            // EIO: the error a block client passes on as a failed read.
            assert!(
                e.starts_with("5 ") || e.contains("Input/output error"),
                "{what}: expected EIO, got {e}"
            )
        }
        other => panic!("{what}: no source holds these bytes any more, yet {other:?}"),
    }
}

fn lazyblk_ok(args: &[&str]) -> String {
    let (ok, out, err) = run(args);
    assert!(ok, "lazyblk {}: {out}{err}", args.join(" "));
    out
}

fn fuse_usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0;
    if !ok {
        eprintln!("skipping: needs root and /dev/fuse");
    }
    ok
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A published template of [`TEMPLATE_SIZE`] bytes of `seed`'s pattern: its bytes.
fn template(store: &StoreProc, dir: &Path, id: &str, seed: u64) -> Vec<u8> {
    let bytes = pattern(TEMPLATE_SIZE, seed);
    let path = dir.join(format!("{id}.img"));
    std::fs::write(&path, &bytes).unwrap();
    publish(&store.url(), &path, id);
    assert_eq!(
        manifest_json(&store.url(), id)["chunk_size"].as_u64(),
        Some(CHUNK as u64)
    );
    bytes
}

#[test]
fn reads_of_images_deleted_meanwhile_get_right_bytes_or_a_clear_error() {
    if !fuse_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let base = template(&store, tmp.path(), "doomed", 3);
    let other = template(&store, tmp.path(), "other", 9);
    let fuse = tmp.path().join("fuse");
    let daemon = DaemonProc::start(
        &store.url(),
        &tmp.path().join("cache"),
        &[
            "--fuse",
            fuse.to_str().unwrap(),
            "--read-deadline",
            READ_DEADLINE,
            "--source-deadline",
            "2",
        ],
    );
    let node = daemon.url();
    lazyblk_ok(&[
        "overlay",
        "create",
        "doomed",
        "--sandbox",
        "sb",
        "--node",
        &node,
    ]);
    let sb_file = fuse.join("sandboxes/sb");
    let tpl_file = fuse.join("templates/doomed");
    wait_for("the FUSE files", || sb_file.exists() && tpl_file.exists());

    // Clients open the sandbox and the template through both doors, read a chunk each
    // (cached on the node) and write to the sandbox.
    let mut nbd_sb = NbdClient::connect(&daemon.nbd_uri("sb"));
    let mut nbd_tpl = NbdClient::connect(&daemon.nbd_uri("doomed"));
    let fuse_sb = FuseClient::open(&sb_file, true);
    let fuse_tpl = FuseClient::open(&tpl_file, false);
    let mut expect = base.clone();
    let by_nbd = pattern(64 << 10, 41);
    let by_fuse = pattern(64 << 10, 42);
    assert_eq!(nbd_sb.write(CHUNK, &by_nbd), Reply::Done);
    expect[CHUNK..CHUNK + by_nbd.len()].copy_from_slice(&by_nbd);
    assert_eq!(fuse_sb.write(2 * CHUNK, &by_fuse), Reply::Done);
    expect[2 * CHUNK..2 * CHUNK + by_fuse.len()].copy_from_slice(&by_fuse);
    assert_eq!(nbd_sb.flush(), Reply::Done);
    assert_eq!(fuse_sb.fsync(), Reply::Done);
    assert_bytes(
        nbd_sb.read(0, 4096),
        &expect[..4096],
        "sandbox chunk 0 (NBD)",
    );
    assert_bytes(
        fuse_sb.read(2 * CHUNK, 8192),
        &expect[2 * CHUNK..2 * CHUNK + 8192],
        "sandbox write (FUSE)",
    );
    assert_bytes(
        nbd_tpl.read(3 * CHUNK, 4096),
        &base[3 * CHUNK..3 * CHUNK + 4096],
        "template chunk 3 (NBD)",
    );
    assert_bytes(
        fuse_tpl.read(4 * CHUNK, 4096),
        &base[4 * CHUNK..4 * CHUNK + 4096],
        "template chunk 4 (FUSE)",
    );

    // 1. The sandbox is deleted while both doors hold it open. Its users keep what
    //    they hold: their writes read back, and the template shows through the rest.
    lazyblk_ok(&["overlay", "delete", "sb", "--force", "--node", &node]);
    wait_for("the FUSE sandbox file to go", || !sb_file.exists());
    assert_bytes(
        nbd_sb.read(CHUNK, 8192),
        &expect[CHUNK..CHUNK + 8192],
        "a deleted sandbox's write (NBD)",
    );
    assert_bytes(
        fuse_sb.read(CHUNK, 8192),
        &expect[CHUNK..CHUNK + 8192],
        "a deleted sandbox's write (FUSE)",
    );
    assert_bytes(
        fuse_sb.read(0, 4096),
        &expect[..4096],
        "a deleted sandbox's template bytes (FUSE)",
    );
    let late = pattern(8192, 43);
    assert_eq!(
        nbd_sb.write(5 * CHUNK, &late),
        Reply::Done,
        "a write to a deleted sandbox"
    );
    expect[5 * CHUNK..5 * CHUNK + late.len()].copy_from_slice(&late);
    let flushed = nbd_sb.flush();
    assert!(
        matches!(flushed, Reply::Done | Reply::Error(_)),
        "flush of a deleted sandbox: {flushed:?}"
    );
    assert_bytes(
        nbd_sb.read(5 * CHUNK, 8192),
        &late,
        "a write after the delete (NBD)",
    );
    // A new opener does not find it.
    let (ok, _, _) = support::node::nbdsh(&daemon.nbd_uri("sb"), "h.get_size()");
    assert!(!ok, "a new NBD client opened a deleted sandbox");
    assert!(
        File::open(&sb_file).is_err(),
        "a new FUSE open found a deleted sandbox"
    );

    // 2. The template is evicted from the node while clients read it: its chunks are
    //    fetched again, checked, from the store.
    lazyblk_ok(&["evict", "doomed", "--force", "--node", &node]);
    assert_bytes(
        nbd_tpl.read(3 * CHUNK, 4096),
        &base[3 * CHUNK..3 * CHUNK + 4096],
        "an evicted template (NBD)",
    );
    assert_bytes(
        fuse_tpl.read(4 * CHUNK, 4096),
        &base[4 * CHUNK..4 * CHUNK + 4096],
        "an evicted template (FUSE)",
    );
    assert_bytes(
        nbd_sb.read(6 * CHUNK, 4096),
        &expect[6 * CHUNK..6 * CHUNK + 4096],
        "a deleted sandbox over an evicted template",
    );

    // 3. The template is deleted from the store and its chunks collected, then evicted
    //    from the node again: what the node no longer holds and no source has any more
    //    fails with EIO inside the read's budget; what a client wrote still reads back.
    lazyblk_ok(&["delete", "doomed", "--store", &store.url()]);
    lazyblk_ok(&["gc", "--grace", "0s", "--store", &store.url()]);
    lazyblk_ok(&["evict", "doomed", "--force", "--node", &node]);
    assert_error(nbd_tpl.read(3 * CHUNK, 4096), "a deleted template (NBD)");
    // The kernel may keep what it read of a read-only template's FUSE file (page cache);
    // those bytes were checked when fetched. What it never read must fail.
    assert_right_or_error(
        fuse_tpl.read(4 * CHUNK, 4096),
        &base[4 * CHUNK..4 * CHUNK + 4096],
        "a deleted template, read before (FUSE)",
    );
    assert_error(fuse_tpl.read(6 * CHUNK, 4096), "a deleted template (FUSE)");
    assert_error(
        nbd_tpl.read(7 * CHUNK, 4096),
        "a deleted template never read (NBD)",
    );
    assert_error(
        nbd_sb.read(7 * CHUNK, 4096),
        "a deleted sandbox's deleted template (NBD)",
    );
    assert_error(
        fuse_sb.read(7 * CHUNK, 4096),
        "a deleted sandbox's deleted template (FUSE)",
    );
    assert_bytes(
        nbd_sb.read(CHUNK, 8192),
        &expect[CHUNK..CHUNK + 8192],
        "what the deleted sandbox wrote (NBD)",
    );
    assert_bytes(
        fuse_sb.read(2 * CHUNK, 8192),
        &expect[2 * CHUNK..2 * CHUNK + 8192],
        "what the deleted sandbox wrote (FUSE)",
    );
    // A write over part of a block it never wrote needs the template's bytes: written
    // whole or refused, then read back right or refused, never mixed with wrong bytes.
    let partial = pattern(512, 44);
    let wrote = nbd_sb.write(7 * CHUNK + 100, &partial);
    let mut want = base[7 * CHUNK..7 * CHUNK + 4096].to_vec();
    want[100..612].copy_from_slice(&partial);
    if wrote == Reply::Done {
        assert_right_or_error(
            nbd_sb.read(7 * CHUNK, 4096),
            &want,
            "a partial write over a deleted template",
        );
    } else {
        assert!(matches!(wrote, Reply::Error(_)), "{wrote:?}");
    }
    // Every request was answered: the daemon is alive and serves its other images.
    let copy = FuseClient::open(&fuse.join("templates/other"), false);
    assert_bytes(
        copy.read(0, TEMPLATE_SIZE),
        &other,
        "another template (FUSE)",
    );
    let mut nbd_other = NbdClient::connect(&daemon.nbd_uri("other"));
    assert_bytes(
        nbd_other.read(5 * CHUNK, 4096),
        &other[5 * CHUNK..5 * CHUNK + 4096],
        "another template (NBD)",
    );

    // 4. Its last users close it, and the id is published again with other bytes: a
    //    new opener gets the new template (through both doors), never the deleted
    //    one's bytes or its missing chunks.
    drop((nbd_sb, nbd_tpl, fuse_sb, fuse_tpl));
    wait_for("the node to see the deleted template's users gone", || {
        let Ok((200, body)) = support::http_get(&format!("{node}/v1/templates/doomed")) else {
            return false;
        };
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        status["users"].as_array().is_some_and(Vec::is_empty)
    });
    let again = template(&store, tmp.path(), "doomed", 5);
    let mut nbd_new = NbdClient::connect(&daemon.nbd_uri("doomed"));
    assert_bytes(
        nbd_new.read(0, 4096),
        &again[..4096],
        "the id published again (NBD)",
    );
    let fuse_new = FuseClient::open(&tpl_file, false);
    assert_bytes(
        fuse_new.read(4 * CHUNK, 4096),
        &again[4 * CHUNK..4 * CHUNK + 4096],
        "the id published again (FUSE)",
    );
    drop((nbd_other, copy, nbd_new, fuse_new));
    drop(daemon);
}
