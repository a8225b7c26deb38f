mod support;
use std::sync::Arc;
use std::os::unix::fs::MetadataExt;
use lazyblk_fuse::{File, Files, Folder};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Probe { size: u64, reads: AtomicUsize, max_len: AtomicUsize, writes: AtomicUsize, max_wlen: AtomicUsize }
impl File for Probe {
    fn size(&self) -> u64 { self.size }
    fn writable(&self) -> bool { true }
    async fn read(&self, _o: u64, buf: &mut [u8]) -> std::io::Result<()> { self.reads.fetch_add(1, Ordering::SeqCst); self.max_len.fetch_max(buf.len(), Ordering::SeqCst); buf.fill(1); Ok(()) }
    async fn write(&self, _o: u64, d: &[u8]) -> std::io::Result<()> { self.writes.fetch_add(1, Ordering::SeqCst); self.max_wlen.fetch_max(d.len(), Ordering::SeqCst); Ok(()) }
    async fn flush(&self) -> std::io::Result<()> { Ok(()) }
}
struct P(Arc<Probe>);
impl Files for P { type File = Probe; fn list(&self, _f: Folder) -> Vec<String> { vec!["p".into()] } fn open(&self, _f: Folder, _n: &str) -> Option<Arc<Probe>> { Some(self.0.clone()) } }

#[test]
fn probe() {
    let rt = support::runtime();
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(Probe { size: 512 << 20, reads: 0.into(), max_len: 0.into(), writes: 0.into(), max_wlen: 0.into() });
    let m = lazyblk_fuse::mount(dir.path(), Arc::new(P(p.clone())), rt.handle().clone(), Default::default()).unwrap();
    let f = dir.path().join("templates/p");
    let dev = std::fs::metadata(dir.path()).unwrap().dev();
    let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    eprintln!("read_ahead_kb = {:?}", std::fs::read_to_string(&knob));
    for (label, args) in [("buffered", vec!["bs=1M"]), ("direct", vec!["bs=4M", "iflag=direct"])] {
        p.reads.store(0, Ordering::SeqCst); p.max_len.store(0, Ordering::SeqCst);
        let t = std::time::Instant::now();
        let mut cmd = std::process::Command::new("dd");
        cmd.arg(format!("if={}", f.display())).arg("of=/dev/null");
        for a in &args { cmd.arg(a); }
        let out = cmd.output().unwrap();
        eprintln!("{label}: {:?} reads={} max_len={} {}", t.elapsed(), p.reads.load(Ordering::SeqCst), p.max_len.load(Ordering::SeqCst), String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    let s = dir.path().join("sandboxes/p");
    for (label, args) in [("wbuffered", vec!["bs=1M", "count=256"]), ("wdirect", vec!["bs=4M", "count=64", "oflag=direct"])] {
        p.writes.store(0, Ordering::SeqCst); p.max_wlen.store(0, Ordering::SeqCst);
        let t = std::time::Instant::now();
        let mut cmd = std::process::Command::new("dd");
        cmd.arg("if=/dev/zero").arg(format!("of={}", s.display())).arg("conv=notrunc");
        for a in &args { cmd.arg(a); }
        let out = cmd.output().unwrap();
        eprintln!("{label}: {:?} writes={} max_len={} {}", t.elapsed(), p.writes.load(Ordering::SeqCst), p.max_wlen.load(Ordering::SeqCst), String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    m.unmount().unwrap();
}
