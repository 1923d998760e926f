//! Nix's base-32: the alphabet `0123456789abcdfghijklmnpqrsvwxyz` (no e, o, u, t), bits
//! taken least significant first and the characters written last first. No crate with a
//! compatible licence encodes it (data-encoding cannot reverse the character order), and
//! it is twenty lines.
//!
//! Invariant: `decode` accepts exactly the strings `encode` produces; a string whose
//! leading character carries bits beyond the byte length is refused, as Nix refuses it.

use crate::error::FormatError;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// The length of `n` bytes encoded.
pub const fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = bytes[i] as u16 >> j;
        let high = bytes.get(i + 1).map_or(0, |&x| (x as u16) << (8 - j));
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes `s` into exactly `n` bytes.
pub fn decode(s: &str, n: usize) -> Result<Vec<u8>, FormatError> {
    if s.len() != encoded_len(n) {
        return Err(FormatError::Base32(format!(
            "{} has {} characters, expected {} for {n} bytes",
            crate::error::excerpt(s),
            s.len(),
            encoded_len(n)
        )));
    }
    let mut out = vec![0u8; n];
    for (k, c) in s.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|&a| a == c).ok_or_else(|| {
            FormatError::Base32(format!(
                "{} contains {:?}, not in the alphabet",
                crate::error::excerpt(s),
                c as char
            ))
        })? as u16;
        let b = k * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < n {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(FormatError::Base32(format!(
                "{} encodes more than {n} bytes",
                crate::error::excerpt(s)
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_it_never_writes() {
        for n in [0usize, 1, 5, 20, 32, 64] {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(n));
            assert_eq!(decode(&s, n).unwrap(), bytes);
        }
        // From `nix-hash --type sha256 --to-base32 00…01`.
        let mut one = [0u8; 32];
        one[31] = 1;
        assert_eq!(
            encode(&one),
            "0080000000000000000000000000000000000000000000000000"
        );
        assert!(decode("e080000000000000000000000000000000000000000000000000", 32).is_err());
        // The first character holds 256 - 255 = 1 bit of a 32-byte value: 1 is fine, 2 is not.
        assert!(decode("1000000000000000000000000000000000000000000000000000", 32).is_ok());
        assert!(decode("2000000000000000000000000000000000000000000000000000", 32).is_err());
        assert!(decode("00", 32).is_err());
    }
}
