//! `image_folder`: a directory of images, one subdirectory per class (the ImageNet /
//! torchvision ImageFolder layout), or a flat folder of unlabeled images.
//!
//! The listing is made once, sorted by path bytes (so it is the same on every machine), and
//! labels are the class folders' sorted positions. Files are read by the workers and passed
//! on encoded; `decode` turns them into pixels.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use simclr_core::{
    Context, Payload, PortType, Problem, Role, Sample, SampleCtx, Source, SourceOptions, Stage, StageConfig,
    StageError,
};

use super::check_exists;

/// File extensions read (case-insensitive).
pub const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp"];

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageFolder {
    /// The root folder.
    pub path: PathBuf,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(OsStr::to_str)
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn sorted_entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort_by(|a, b| a.as_os_str().as_encoded_bytes().cmp(b.as_os_str().as_encoded_bytes()));
    Ok(v)
}

/// The files of a folder with their labels, and the class names.
pub type Listing = (Vec<(PathBuf, Option<u32>)>, Vec<String>);

/// Lists (file, label) pairs: class folders if there are any, else the flat files.
pub fn scan(root: &Path) -> std::io::Result<Listing> {
    let entries = sorted_entries(root)?;
    let classes: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    let mut files = Vec::new();
    let mut names = Vec::new();
    if classes.is_empty() {
        files.extend(entries.iter().filter(|p| is_image(p)).map(|p| (p.clone(), None)));
        return Ok((files, names));
    }
    for (label, dir) in classes.iter().enumerate() {
        names.push(dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let mut stack = vec![(*dir).clone()];
        let mut found = Vec::new();
        while let Some(d) = stack.pop() {
            for p in sorted_entries(&d)? {
                if p.is_dir() {
                    stack.push(p);
                } else if is_image(&p) {
                    found.push(p);
                }
            }
        }
        found.sort_by(|a, b| a.as_os_str().as_encoded_bytes().cmp(b.as_os_str().as_encoded_bytes()));
        files.extend(found.into_iter().map(|p| (p, Some(label as u32))));
    }
    Ok((files, names))
}

impl StageConfig for ImageFolder {
    const KIND: &'static str = "image_folder";
    const ABOUT: &'static str = "source: a folder of JPEG/PNG/WebP images (class subfolders or flat)";
    const ROLE: Role = Role::Source;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Nothing, PortType::Encoded)
    }
    fn check(&self, cx: &Context, out: &mut Vec<Problem>) {
        let root = cx.resolve(&self.path);
        if check_exists("path", &root, "the image folder", out) && !root.is_dir() {
            out.push(Problem::new(
                "path",
                format!("`{}` is not a folder", root.display()),
                "point `path` at a folder of images",
            ));
        }
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        let root = cx.resolve(&self.path);
        let (files, _) =
            scan(&root).map_err(|e| StageError::fatal(format!("cannot list {}: {e}", root.display())))?;
        if files.is_empty() {
            return Err(StageError::fatal(format!(
                "no images ({}) in {}",
                EXTENSIONS.join(", "),
                root.display()
            )));
        }
        let files = files.into_iter().map(|(p, l)| (Arc::from(p.to_string_lossy().as_ref()), p, l)).collect();
        Ok(Stage::Source(Arc::new(FolderSource { files, opts: cx.source })))
    }
}

struct FolderSource {
    files: Vec<(Arc<str>, PathBuf, Option<u32>)>,
    opts: SourceOptions,
}

impl Source for FolderSource {
    fn len(&self) -> u64 {
        self.files.len() as u64
    }
    fn options(&self) -> SourceOptions {
        self.opts
    }
    fn read(&self, index: u64, _ctx: &SampleCtx) -> Result<Sample, StageError> {
        let (name, path, label) = self
            .files
            .get(index as usize)
            .ok_or_else(|| StageError::fatal(format!("index {index} is past the end of the data")))?;
        let bytes = std::fs::read(path).map_err(|e| StageError::data(format!("{name}: cannot read: {e}")))?;
        Ok(Sample {
            index,
            label: *label,
            name: Some(name.clone()),
            payload: Payload::Encoded(bytes),
            ..Sample::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_folders_give_sorted_labels() {
        let dir = tempfile::tempdir().unwrap();
        for (class, file) in [("b_dog", "1.jpg"), ("a_cat", "2.PNG"), ("a_cat", "1.webp"), ("b_dog", "x.txt")]
        {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            std::fs::write(dir.path().join(class).join(file), b"x").unwrap();
        }
        let (files, names) = scan(dir.path()).unwrap();
        assert_eq!(names, vec!["a_cat", "b_dog"]);
        let got: Vec<(String, Option<u32>)> =
            files.iter().map(|(p, l)| (p.file_name().unwrap().to_string_lossy().into_owned(), *l)).collect();
        assert_eq!(
            got,
            vec![("1.webp".into(), Some(0)), ("2.PNG".into(), Some(0)), ("1.jpg".into(), Some(1))]
        );
    }

    #[test]
    fn a_flat_folder_is_unlabeled() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.jpg"), b"x").unwrap();
        std::fs::write(dir.path().join("a.jpeg"), b"x").unwrap();
        let (files, names) = scan(dir.path()).unwrap();
        assert!(names.is_empty());
        assert_eq!(files.len(), 2);
        assert!(files[0].0.ends_with("a.jpeg") && files[0].1.is_none());
    }
}
