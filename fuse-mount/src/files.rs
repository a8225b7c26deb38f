//! The mount's two folders and the kind of image each shows: the one piece of naming
//! this frontend adds to `lazyblk-image`'s [`Images`](lazyblk_image::Images).

use lazyblk_image::Kind;

/// The two folders at the top of the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Folder {
    /// `templates/`: read-only files, one per template.
    Templates,
    /// `sandboxes/`: read-write files, one per sandbox overlay.
    Sandboxes,
}

impl Folder {
    /// Both folders, in the order a directory listing shows them.
    pub const ALL: [Folder; 2] = [Folder::Templates, Folder::Sandboxes];

    /// The folder's directory name under the mount point.
    pub fn dir_name(self) -> &'static str {
        match self {
            Folder::Templates => "templates",
            Folder::Sandboxes => "sandboxes",
        }
    }

    /// The kind of image the folder shows.
    pub fn kind(self) -> Kind {
        match self {
            Folder::Templates => Kind::Template,
            Folder::Sandboxes => Kind::Sandbox,
        }
    }

    /// The user named when a file of this folder is opened ("fuse file sandboxes/sb1"):
    /// shown in the daemon's status and in its refusals to delete an image in use.
    pub fn user(self, name: &str) -> String {
        format!("fuse file {}/{name}", self.dir_name())
    }

    /// The folder called `name`, if there is one.
    pub fn from_dir_name(name: &str) -> Option<Folder> {
        Folder::ALL.into_iter().find(|f| f.dir_name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_round_trip() {
        for folder in Folder::ALL {
            assert_eq!(Folder::from_dir_name(folder.dir_name()), Some(folder));
        }
        assert_eq!(Folder::from_dir_name("overlays"), None);
    }
}
