//! The SHA-256 digest of a secret, compared in constant time.

use std::fmt;

use sha2::{Digest as _, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// `SHA-256(secret)`: what the store keeps instead of the secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Hashes the ASCII bytes of a secret.
    pub fn of(secret: &[u8]) -> Digest {
        Digest(Sha256::digest(secret).into())
    }

    /// Rebuilds a digest read back from the store; `None` if it is not 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Digest> {
        bytes.try_into().ok().map(Digest)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time equality: the time taken does not depend on where the
    /// digests first differ.
    ///
    /// The four 64-bit words are XORed and ORed together without a branch,
    /// and only the union is tested, by `subtle`: the same property as
    /// `subtle`'s byte-by-byte slice comparison, in a quarter of the steps.
    pub fn ct_eq(&self, other: &Digest) -> Choice {
        let difference = self
            .0
            .chunks_exact(8)
            .zip(other.0.chunks_exact(8))
            .fold(0u64, |union, (a, b)| union | (word(a) ^ word(b)));
        difference.ct_eq(&0)
    }
}

/// Eight bytes as a machine word (`chunks_exact(8)` guarantees the length).
fn word(bytes: &[u8]) -> u64 {
    u64::from_ne_bytes(bytes.try_into().unwrap_or([0; 8]))
}

impl fmt::Debug for Digest {
    // A digest is not a secret, but there is no reason to print it either:
    // it would only help an offline guessing attack.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Digest(sha256)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_and_different_digests() {
        let a = Digest::of(b"abc");
        let b = Digest::of(b"abc");
        let c = Digest::of(b"abd");
        assert!(bool::from(a.ct_eq(&b)));
        assert!(!bool::from(a.ct_eq(&c)));
        assert_eq!(Digest::from_slice(a.as_bytes()), Some(a));
        assert_eq!(Digest::from_slice(&[0u8; 31]), None);
        assert_eq!(format!("{a:?}"), "Digest(sha256)");
    }

    #[test]
    fn a_difference_in_any_bit_is_seen() {
        let a = Digest::of(b"abc");
        for byte in 0..32 {
            for bit in 0..8 {
                let mut flipped = *a.as_bytes();
                flipped[byte] ^= 1 << bit;
                let b = Digest::from_slice(&flipped).unwrap();
                assert!(!bool::from(a.ct_eq(&b)), "byte {byte} bit {bit}");
            }
        }
    }
}
