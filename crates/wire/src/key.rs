//! The swarm key: the one secret every node of a swarm shares (issue #14, `docs/SECURITY.md`).
//!
//! 32 random bytes, written as 64 hex digits. Holding it is what makes a device a member:
//! every peer connection proves it on both sides and is encrypted under keys derived from it
//! ([`crate::secure`]). It is never printed by `Debug`; logs name a key by its [`SwarmKey::id`],
//! a short hash that says whether two nodes hold the same key without revealing it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Bytes in a swarm key.
pub const KEY_LEN: usize = 32;

/// A swarm's shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SwarmKey([u8; KEY_LEN]);

/// Why a swarm key could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text is not 64 hex digits long.
    #[error(
        "a swarm key is {expected} hex digits, this one has {found}; make one with `shoal key new`",
        expected = 2 * KEY_LEN
    )]
    Length {
        /// Hex digits found.
        found: usize,
    },
    /// A character that is not a hex digit.
    #[error(
        "a swarm key is hex digits only; character {at} is not one (make one with `shoal key new`)"
    )]
    NotHex {
        /// Where, counting from 1.
        at: usize,
    },
    /// The key file cannot be read.
    #[error("cannot read the swarm key file {}: {source}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("swarm key file {}: {source}", .path.display())]
    FileContents {
        /// The file.
        path: PathBuf,
        /// What is wrong with its text.
        source: Box<KeyError>,
    },
    /// The operating system gave no random bytes.
    #[error("could not get random bytes from the operating system: {0}")]
    Random(String),
}

impl SwarmKey {
    /// A new random key, from the operating system's generator.
    pub fn generate() -> Result<SwarmKey, KeyError> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SwarmKey(bytes))
    }

    /// The key in a file (64 hex digits; white space around them ignored).
    pub fn read_file(path: &Path) -> Result<SwarmKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::File {
            path: path.to_owned(),
            source,
        })?;
        text.parse().map_err(|e| KeyError::FileContents {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> SwarmKey {
        SwarmKey(bytes)
    }

    /// The secret itself, for the handshake.
    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key as 64 hex digits: what `shoal key new` prints and `--swarm-key` reads. Named
    /// so that printing a key is always a visible decision.
    pub fn reveal(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A short public name for the key (8 hex digits of a hash of it): two nodes with the
    /// same id hold the same key. Safe to log; it gives nothing away about the key.
    pub fn id(&self) -> String {
        let digest = Sha256::new()
            .chain_update(b"shoal swarm key id\0")
            .chain_update(self.0)
            .finalize();
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SwarmKey(id {})", self.id())
    }
}

impl FromStr for SwarmKey {
    type Err = KeyError;

    /// 64 hex digits, either case; surrounding white space (a key file's newline) ignored.
    fn from_str(text: &str) -> Result<SwarmKey, KeyError> {
        let text = text.trim();
        let digits: Vec<char> = text.chars().collect();
        if digits.len() != 2 * KEY_LEN {
            return Err(KeyError::Length {
                found: digits.len(),
            });
        }
        let mut bytes = [0u8; KEY_LEN];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let digit = |at: usize| {
                digits[at]
                    .to_digit(16)
                    .map(|d| d as u8)
                    .ok_or(KeyError::NotHex { at: at + 1 })
            };
            *byte = (digit(2 * i)? << 4) | digit(2 * i + 1)?;
        }
        Ok(SwarmKey(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_reads_back_what_it_writes() {
        let key = SwarmKey::generate().unwrap();
        let text = key.reveal();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<SwarmKey>().unwrap(), key);
        assert_eq!(
            format!(" {}\n", text.to_uppercase())
                .parse::<SwarmKey>()
                .unwrap(),
            key
        );
        assert_ne!(SwarmKey::generate().unwrap(), key, "keys are random");
    }

    #[test]
    fn bad_text_says_what_is_wrong() {
        let err = "abc".parse::<SwarmKey>().unwrap_err().to_string();
        assert!(err.contains("64 hex digits, this one has 3"), "{err}");
        assert!(err.contains("shoal key new"), "{err}");
        let mut text = "0".repeat(64);
        text.replace_range(9..10, "g");
        let err = text.parse::<SwarmKey>().unwrap_err().to_string();
        assert!(err.contains("character 10"), "{err}");
        assert!("é".repeat(64).parse::<SwarmKey>().is_err());
    }

    #[test]
    fn debug_and_id_never_show_the_key() {
        let key = SwarmKey::from_bytes([0xab; KEY_LEN]);
        let shown = format!("{key:?} {}", key.id());
        assert!(!shown.contains("abab"), "{shown}");
        assert_eq!(key.id().len(), 8);
        assert_ne!(key.id(), SwarmKey::from_bytes([0; KEY_LEN]).id());
    }
}
