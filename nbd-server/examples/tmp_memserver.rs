use lazyblk_nbd::*;
use std::io;
use std::sync::{Arc, RwLock};

struct Mem {
    data: RwLock<Vec<u8>>,
    ro: bool,
}
impl Export for Mem {
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.ro
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.read().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        let mut d = self.data.write().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, o: u64, l: u64, f: bool) -> io::Result<()> {
        self.write_zeroes(o, l, f).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, _f: bool) -> io::Result<()> {
        let mut d = self.data.write().unwrap();
        d[o as usize..(o + l) as usize].fill(0);
        Ok(())
    }
    async fn cache(&self, _o: u64, _l: u64) -> io::Result<()> {
        Ok(())
    }
    async fn block_status(&self, _o: u64, l: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: l,
            hole: false,
            zero: false,
        }])
    }
}
struct All {
    ro: Arc<Mem>,
    rw: Arc<Mem>,
}
impl Exports for All {
    type Export = Mem;
    async fn open(&self, name: &str, _peer: &str) -> Result<Arc<Mem>, OpenError> {
        match name {
            "ro" | "" => Ok(self.ro.clone()),
            "rw" => Ok(self.rw.clone()),
            _ => Err(OpenError::Unknown),
        }
    }
    async fn list(&self) -> Vec<(String, String)> {
        vec![("ro".into(), "".into()), ("rw".into(), "".into())]
    }
}
#[tokio::main]
async fn main() {
    let size = 256 << 20;
    let data: Vec<u8> = (0..size).map(|i: usize| (i % 251) as u8).collect();
    let all = Arc::new(All {
        ro: Arc::new(Mem {
            data: RwLock::new(data.clone()),
            ro: true,
        }),
        rw: Arc::new(Mem {
            data: RwLock::new(data),
            ro: false,
        }),
    });
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:10809".into());
    let l = Listener::bind(&addr).await.unwrap();
    serve(l, all, ServerConfig::default(), async {
        tokio::signal::ctrl_c().await.unwrap();
    })
    .await
    .unwrap();
}
