//! The images a frontend can open and list: templates (read-only) and sandboxes
//! (read-write), by name.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::image::Image;
use crate::op::{Door, Op};

/// The two kinds of image a node serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A template: read-only, shared by every sandbox made from it.
    Template,
    /// A sandbox: a read-write overlay over a template.
    Sandbox,
}

impl Kind {
    /// Both kinds, in the order listings show them.
    pub const ALL: [Kind; 2] = [Kind::Template, Kind::Sandbox];
}

/// One image in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub name: String,
    pub kind: Kind,
    /// One line for people ("template (read-only)").
    pub description: String,
}

/// Why an image could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// No image has this name.
    Unknown,
    /// The image exists but cannot be served now; the text says why, for the client.
    Unavailable(String),
}

/// The set of images a frontend offers. Every open names its user (shown in status and
/// in refusals, "nbd client 127.0.0.1:4711", "fuse file sandboxes/sb1"); the returned
/// image is held for as long as that user uses it, and dropping it releases the use.
pub trait Images: Send + Sync + 'static {
    /// The image type a name opens to.
    type Image: Image;

    /// Opens the image called `name` (a sandbox, else a template) for `user`; may wait
    /// on the network (a template this node has not seen yet is looked up).
    fn open(
        &self,
        name: &str,
        user: &str,
    ) -> impl Future<Output = Result<Arc<Self::Image>, OpenError>> + Send;

    /// Opens the `kind` image called `name` from local state only: never waits on the
    /// network (a file system's lookup is answered on the kernel's thread).
    fn open_local(&self, kind: Kind, name: &str, user: &str)
        -> Result<Arc<Self::Image>, OpenError>;

    /// Every image, the network's too (templates the store has that this node has not
    /// opened yet).
    fn list(&self) -> impl Future<Output = Vec<Listing>> + Send;

    /// The names of the `kind` images known locally; never waits on the network.
    fn list_local(&self, kind: Kind) -> Vec<String>;

    /// Called once per finished operation, for metrics. `bytes` is the data moved for
    /// reads and writes, the range covered otherwise; `ok` is false when the client got
    /// an error. Default: nothing.
    fn observe(&self, _door: Door, _op: Op, _bytes: u64, _elapsed: Duration, _ok: bool) {}

    /// Called with the bytes of a read's file pieces once a frontend sent them without
    /// copying ([`crate::ReadImage::resident_pieces`]). Default: nothing.
    fn spliced(&self, _bytes: u64) {}
}
