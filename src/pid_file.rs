//! `--pid-file`: the process id, written at start (before the `listening` lines) and removed
//! when the process exits.
//! Written to a temporary name and renamed, so a reader never sees half a number; removed
//! only while it still names this process, so that a process that took over the file (as an
//! upgrade in place will) keeps it.

use std::io;
use std::path::{Path, PathBuf};

/// The pid file of this process, removed on drop if it still names this process.
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Writes this process's id to `path` (`<pid>\n`).
    pub fn write(path: &Path) -> io::Result<PidFile> {
        let pid = Self::rewrite(path)?;
        Ok(PidFile {
            path: path.to_owned(),
            pid,
        })
    }

    /// Writes this process's id to `path` again, leaving the removal to the [`PidFile`]
    /// made at start: after an upgrade in place that failed, the new process may have
    /// written its own id there, or removed the file.
    pub fn rewrite(path: &Path) -> io::Result<u32> {
        let pid = std::process::id();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{pid}.tmp"));
        std::fs::write(&tmp, format!("{pid}\n"))?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        Ok(pid)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|text| text.trim() == self.pid.to_string());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_then_removed_unless_another_process_took_it_over() {
        let dir = std::env::temp_dir().join(format!("nudge-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nudge.pid");
        let file = PidFile::write(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(file);
        assert!(!path.exists());

        let file = PidFile::write(&path).unwrap();
        std::fs::write(&path, "1\n").unwrap(); // another process took it over
        drop(file);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
