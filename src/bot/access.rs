//! Who besides server admins and `bot.admins` may command the bot: the list `allow` and
//! `disallow` edit, kept as JSON in state/bot/allowed.json (root, 0600).
//!
//! Plain user IDs, compared exactly: the old Python bot stored compiled regexes as strings,
//! which matched nobody after a restart and locked everyone out
//! (moan0s/matrix-registration-bot#29, #37).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil::{Owner, write_atomic};

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    allowed: BTreeSet<String>,
}

#[derive(Debug)]
pub struct AllowList {
    path: PathBuf,
    users: BTreeSet<String>,
}

impl AllowList {
    /// Reads `dir/allowed.json`; a missing file is an empty list.
    pub fn load(dir: &Path) -> Result<AllowList> {
        let path = dir.join("allowed.json");
        let users = match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str::<File>(&text)
                    .with_context(|| {
                        format!(
                            "reading {}; fix its JSON ({{\"allowed\": [\"@alice:example.com\"]}}) or delete it to start with nobody allowed",
                            path.display()
                        )
                    })?
                    .allowed
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(AllowList { path, users })
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains(user)
    }

    pub fn users(&self) -> Vec<String> {
        self.users.iter().cloned().collect()
    }

    /// Adds the users and saves; returns those that were not on the list yet.
    pub fn add(&mut self, users: &[String]) -> Result<Vec<String>> {
        let added: Vec<String> = users
            .iter()
            .filter(|u| self.users.insert((*u).clone()))
            .cloned()
            .collect();
        if !added.is_empty() {
            self.save()?;
        }
        Ok(added)
    }

    /// Removes the users and saves; returns those that were on the list.
    pub fn remove(&mut self, users: &[String]) -> Result<Vec<String>> {
        let removed: Vec<String> = users
            .iter()
            .filter(|u| self.users.remove(*u))
            .cloned()
            .collect();
        if !removed.is_empty() {
            self.save()?;
        }
        Ok(removed)
    }

    fn save(&self) -> Result<()> {
        let file = File {
            allowed: self.users.clone(),
        };
        let mut text = serde_json::to_string_pretty(&file).expect("serializes");
        text.push('\n');
        write_atomic(&self.path, text.as_bytes(), owner(), 0o600)
    }
}

/// root in production; the current user in unit tests, which do not run as root.
fn owner() -> Owner {
    Owner {
        uid: nix::unistd::Uid::effective(),
        gid: nix::unistd::Gid::effective(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn survives_a_reload_and_is_private() {
        let d = tempfile::tempdir().unwrap();
        let mut a = AllowList::load(d.path()).unwrap();
        assert!(a.users().is_empty());
        let added = a
            .add(&["@friend:example.com".into(), "@b:x.org".into()])
            .unwrap();
        assert_eq!(added.len(), 2);
        assert!(a.add(&["@friend:example.com".into()]).unwrap().is_empty());
        let b = AllowList::load(d.path()).unwrap();
        assert!(b.contains("@friend:example.com"));
        assert!(!b.contains("@friend:example.org"));
        let mode = std::fs::metadata(d.path().join("allowed.json"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut b = b;
        assert_eq!(
            b.remove(&["@friend:example.com".into(), "@nobody:x".into()])
                .unwrap(),
            ["@friend:example.com"]
        );
        assert_eq!(AllowList::load(d.path()).unwrap().users(), ["@b:x.org"]);
    }

    #[test]
    fn a_broken_file_names_the_fix() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("allowed.json"), "re.compile('x')").unwrap();
        let e = format!("{:#}", AllowList::load(d.path()).unwrap_err());
        assert!(e.contains("delete it"), "{e}");
    }
}
