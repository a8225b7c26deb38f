//! The daemon restarted under the real systemd keeps its FUSE mount and its NBD
//! socket (issue 25): a writer on a sandbox's FUSE file and an NBD client on the unix
//! socket (qemu-io with `reconnect-delay`) carry on through `kill -9` of the daemon
//! and through `systemctl restart`, with no error and their data intact.
//!
//! systemd 252 runs here as PID 1 of a PID and mount namespace (`unshare`), with the
//! packaged unit (`packaging/lazyblk-daemon.service`) and a drop-in that only points
//! `ExecStart` at the binary under test. The FUSE mount point lies in a directory made
//! a shared mount, so the mount the daemon makes inside the namespace is seen here.
//!
//! Needs root, `/lib/systemd/systemd`, `unshare`, `/dev/fuse` and qemu-io; skipped
//! (with a message) without them. `LAZYBLK_SYSTEMD_TEST_BIN` runs another binary under
//! the unit (an older build, to see the test fail).

mod support;

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::{free_port, http_get, make_ext4, pattern, publish, run, StoreProc};

const UNIT: &str = "lazyblk-daemon.service";
/// Generous bound for anything to happen (systemd start, a restart with the unit's
/// RestartSec=2s, a daemon start); the test waits for conditions, not for times.
const WAIT: Duration = Duration::from_secs(60);
/// Blocks of the sandbox file the writer cycles over (its first 4 MiB; qemu-io writes
/// from 8 MiB on).
const BLOCKS: u64 = 64;
const BLOCK: usize = 64 << 10;
/// Writes the writer must finish after a restart before the next step: enough that
/// requests were in flight across it and the new daemon serves them.
const WRITES_AFTER_RESTART: u64 = 200;
/// Where the writer through the loop device works in the sandbox (the FUSE writer has
/// the first 4 MiB, qemu-io 8 MiB on).
const LOOP_OFFSET: u64 = 16 << 20;
/// Rounds of each kind (kill -9, systemctl restart); LAZYBLK_SYSTEMD_ROUNDS changes it.
const ROUNDS: usize = 5;

#[test]
fn fuse_and_nbd_socket_survive_daemon_restarts_under_systemd() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipped: {why}");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(work.path(), 32, &[("hello.txt", b"hello".to_vec())]);
    publish(&store.url(), &image, "tpl");
    let shared = work.path().join("shared");
    let manager = Manager::start(work.path(), &shared, &store.url());
    manager.wait_ready(None);
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        "tpl",
        "--sandbox",
        "sb",
        "--node",
        &manager.api,
    ]);
    assert!(ok, "overlay create: {out}{err}");
    let file = shared.join("fuse/sandboxes/sb");
    wait_for("the sandbox's FUSE file", || file.exists());

    let writer = Writer::start(&file, 0);
    // A loop device over the FUSE file (as a VM's disk would be), written through the
    // block layer by a writer of its own.
    let looped = LoopDevice::attach(&file);
    let loop_writer = looped
        .as_ref()
        .map(|l| Writer::start(&l.device, LOOP_OFFSET));
    let mut nbd = QemuIo::start(&manager.socket, "sb");
    nbd.expect_ok("write -P 0x5a 8M 64k");
    writer.wait_for(WRITES_AFTER_RESTART);
    if let Some(w) = &loop_writer {
        w.wait_for(WRITES_AFTER_RESTART);
    }

    let rounds = std::env::var("LAZYBLK_SYSTEMD_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    let kinds = ["kill -9", "systemctl restart"];
    for (round, how) in (0..2 * rounds).map(|i| kinds[i % 2]).enumerate() {
        let before = manager.main_pid();
        match how {
            "kill -9" => manager.systemctl(&["kill", "--signal=SIGKILL", "--kill-whom=main", UNIT]),
            _ => manager.systemctl(&["restart", "--no-block", UNIT]),
        }
        manager.wait_ready(Some(before));
        let done = writer.done();
        writer.wait_for(done + WRITES_AFTER_RESTART);
        assert_eq!(
            writer.errors(),
            Vec::<String>::new(),
            "FUSE writer, round {round} ({how})"
        );
        if let Some(w) = &loop_writer {
            let done = w.done();
            w.wait_for(done + WRITES_AFTER_RESTART);
            assert_eq!(
                w.errors(),
                Vec::<String>::new(),
                "writer through the loop device, round {round} ({how})"
            );
        }
        // The NBD client's connection died with the daemon; qemu reconnects to the
        // same socket path and reads what it wrote before.
        nbd.expect_ok("read -P 0x5a 8M 64k");
        let at = (8 << 20) + (round + 1) * BLOCK;
        nbd.expect_ok(&format!("write -P 0x{:02x} {at} 64k", 0x10 + round));
        nbd.expect_ok(&format!("read -P 0x{:02x} {at} 64k", 0x10 + round));
    }
    writer.stop_and_verify();
    if let Some(w) = loop_writer {
        w.stop_and_verify();
    }
    drop(looped);
    nbd.quit();
}

/// A loop device over a file, detached on drop; `None` (saying why) where this machine
/// has no loop devices.
struct LoopDevice {
    device: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Option<LoopDevice> {
        if !Path::new("/dev/loop-control").exists() {
            eprintln!("no /dev/loop-control: the loop device part is skipped");
            return None;
        }
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("running losetup");
        assert!(
            out.status.success(),
            "losetup over the FUSE file: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDevice { device })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// What the test needs that this machine may not have.
fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    for path in ["/lib/systemd/systemd", "/dev/fuse", "/usr/bin/unshare"] {
        if !Path::new(path).exists() {
            return Some(format!("no {path}"));
        }
    }
    if Command::new("qemu-io").arg("--version").output().is_err() {
        return Some("no qemu-io".into());
    }
    None
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// systemd as PID 1 of its own PID and mount namespace, running the packaged unit.
struct Manager {
    /// `unshare`, whose child is systemd.
    unshare: Child,
    /// systemd's PID here (outside the namespace).
    pid: u32,
    /// The daemon's output (every start appends), shown when a step fails.
    log: PathBuf,
    api: String,
    socket: PathBuf,
    shared: PathBuf,
}

impl Manager {
    fn start(work: &Path, shared: &Path, store_url: &str) -> Manager {
        let units = work.join("units");
        let dropin = units.join(format!("{UNIT}.d"));
        fs::create_dir_all(&dropin).unwrap();
        let packaged = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("packaging")
            .join(UNIT);
        fs::copy(&packaged, units.join(UNIT)).unwrap();
        // The targets the unit's default dependencies name, empty.
        for target in [
            "sysinit",
            "basic",
            "shutdown",
            "network-online",
            "multi-user",
        ] {
            fs::write(units.join(format!("{target}.target")), "[Unit]\n").unwrap();
        }
        fs::write(
            units.join("lazyblk-test.target"),
            format!("[Unit]\nWants={UNIT}\n"),
        )
        .unwrap();
        let bin = std::env::var_os("LAZYBLK_SYSTEMD_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(support::bin);
        let cache = work.join("cache");
        let socket = work.join("nbd.sock");
        let port = free_port();
        fs::create_dir_all(shared.join("fuse")).unwrap();
        // Only ExecStart (and the directories, which would be the host's /var/lib)
        // differ from the packaged unit, and systemd's start rate limit (5 starts in
        // 10 s), which the test's ten restarts in a row would meet.
        fs::write(
            dropin.join("test.conf"),
            format!(
                "[Unit]\nStartLimitIntervalSec=0\n[Service]\nStateDirectory=\nRuntimeDirectory=\nEnvironment=LAZYBLK_LOG=info,fuser=error\n\
                 StandardOutput=append:{log}\nStandardError=append:{log}\n\
                 ExecStart=\nExecStart={bin} daemon --cache {cache} --cache-size 1G --store {store_url} \
                 --listen 127.0.0.1:{port} --nbd unix:{socket} --fuse {fuse}\n",
                bin = bin.display(),
                cache = cache.display(),
                socket = socket.display(),
                fuse = shared.join("fuse").display(),
                log = work.join("daemon.log").display(),
            ),
        )
        .unwrap();
        // A shared mount: the daemon's FUSE mount inside the namespace shows here.
        sh(&format!(
            "mount --bind {d} {d} && mount --make-shared {d}",
            d = shared.display()
        ));
        let inner = format!(
            "mount -t tmpfs tmpfs /run && exec env container=lazyblk-test SYSTEMD_UNIT_PATH={units} \
             /lib/systemd/systemd --system --unit=lazyblk-test.target --log-target=kmsg",
            units = units.display()
        );
        let unshare = Command::new("unshare")
            .args([
                "--fork",
                "--pid",
                "--mount",
                "--propagation",
                "unchanged",
                "--mount-proc",
            ])
            .args(["sh", "-c", &inner])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare");
        let mut pid = None;
        wait_for("systemd in the namespace", || {
            pid = fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id()))
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse().ok());
            pid.is_some()
        });
        Manager {
            unshare,
            log: work.join("daemon.log"),
            pid: pid.unwrap_or_default(),
            api: format!("http://127.0.0.1:{port}"),
            socket,
            shared: shared.to_path_buf(),
        }
    }

    fn systemctl(&self, args: &[&str]) {
        let out = self.systemctl_output(args);
        assert!(out.0, "systemctl {args:?}: {}", out.1);
    }

    fn systemctl_output(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "-p", "systemctl"])
            .args(args)
            .output()
            .expect("nsenter systemctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    fn show(&self, property: &str) -> String {
        self.systemctl_output(&["show", "-p", property, "--value", UNIT])
            .1
            .trim()
            .to_owned()
    }

    fn main_pid(&self) -> String {
        self.show("MainPID")
    }

    /// Waits until the unit is active (READY=1 sent) with a main process other than
    /// `not`, and its API answers.
    fn wait_ready(&self, not: Option<String>) {
        let deadline = Instant::now() + WAIT;
        loop {
            let pid = self.main_pid();
            if self.show("ActiveState") == "active"
                && pid != "0"
                && Some(&pid) != not.as_ref()
                && http_get(&format!("{}/healthz", self.api)).is_ok_and(|(s, _)| s == 200)
            {
                return;
            }
            if Instant::now() > deadline {
                let status = self.systemctl_output(&["status", "--no-pager", UNIT]).1;
                let log = fs::read_to_string(&self.log).unwrap_or_default();
                panic!("the unit did not become active:\n{status}\n--- daemon log ---\n{log}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        // systemd is PID 1 of the namespace: killing it ends everything in it,
        // systemd's file descriptor store included.
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
        let _ = self.unshare.wait();
        let fuse = self.shared.join("fuse");
        let _ = Command::new("umount").arg("-l").arg(&fuse).status();
        let _ = Command::new("umount").arg("-l").arg(&self.shared).status();
    }
}

fn sh(script: &str) {
    let status = Command::new("sh").args(["-c", script]).status().unwrap();
    assert!(status.success(), "{script}");
}

/// Writes blocks of the sandbox file over and over (each write then read back and
/// compared), fsyncing every few, until stopped; records every error.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<thread::JoinHandle<Vec<u64>>>,
    file: PathBuf,
    base: u64,
}

impl Writer {
    /// Works on `BLOCKS` blocks of `path` from `base` on.
    fn start(path: &Path, base: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let (s, d, e) = (stop.clone(), done.clone(), errors.clone());
        let thread = thread::spawn(move || {
            // The seed last written to each block.
            let mut seeds = vec![u64::MAX; BLOCKS as usize];
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let block = n % BLOCKS;
                let data = pattern(BLOCK, n);
                let offset = base + block * BLOCK as u64;
                let mut back = vec![0u8; BLOCK];
                let result = file
                    .write_all_at(&data, offset)
                    .and_then(|()| {
                        if n.is_multiple_of(16) {
                            file.sync_data()
                        } else {
                            Ok(())
                        }
                    })
                    .and_then(|()| file.read_exact_at(&mut back, offset));
                match result {
                    Ok(()) if back == data => seeds[block as usize] = n,
                    Ok(()) => e
                        .lock()
                        .unwrap()
                        .push(format!("block {block}: read back differs")),
                    Err(err) => {
                        e.lock().unwrap().push(format!("op {n}: {err}"));
                        thread::sleep(Duration::from_millis(100));
                    }
                }
                n += 1;
                d.store(n, Ordering::Relaxed);
            }
            seeds
        });
        Writer {
            stop,
            done,
            errors,
            thread: Some(thread),
            file: path.to_path_buf(),
            base,
        }
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn errors(&self) -> Vec<String> {
        let errors = self.errors.lock().unwrap();
        errors.iter().take(5).cloned().collect()
    }

    fn wait_for(&self, writes: u64) {
        wait_for(&format!("{writes} writes through FUSE"), || {
            self.done() >= writes || !self.errors.lock().unwrap().is_empty()
        });
    }

    /// Stops, then reads every block through a new open and compares it with the
    /// last write made to it.
    fn stop_and_verify(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let seeds = self.thread.take().unwrap().join().unwrap();
        let file = fs::File::open(&self.file).unwrap();
        for (block, seed) in seeds.iter().enumerate() {
            if *seed == u64::MAX {
                continue;
            }
            let mut back = vec![0u8; BLOCK];
            file.read_exact_at(&mut back, self.base + (block * BLOCK) as u64)
                .unwrap();
            assert!(
                back == pattern(BLOCK, *seed),
                "block {block} lost its last write"
            );
        }
    }
}

/// An interactive qemu-io on the NBD export, reconnecting (reconnect-delay) when its
/// connection drops.
struct QemuIo {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl QemuIo {
    fn start(socket: &Path, export: &str) -> QemuIo {
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},export={export},reconnect-delay=60",
            socket.display()
        );
        let mut child = Command::new("qemu-io")
            .args(["--image-opts", &opts])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io");
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        QemuIo {
            child,
            stdin,
            lines,
        }
    }

    /// Runs one command; its output must say every byte went through (and, for
    /// `read -P`, matched).
    fn expect_ok(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("qemu-io {command:?}: no answer; saw {seen:?}"));
            if line.contains("65536/65536 bytes") {
                return;
            }
            assert!(
                !(line.contains("fail") || line.contains("error") || line.contains("Pattern")),
                "qemu-io {command:?}: {line} (saw {seen:?})"
            );
            seen.push(line);
        }
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}
