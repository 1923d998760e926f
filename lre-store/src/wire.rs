//! Just enough of the protobuf wire format to walk a message's fields without decoding
//! it: for bounding what a message would cost before decoding it, and for reading a few
//! fields of a huge message (an output Tree) without building its nodes. Hand-written
//! because prost decodes whole messages only.

/// `(field number, body)` for each field of `buf`: the body of a length-delimited field,
/// `None` for the other wire types (skipped). An error ends the iteration.
pub fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf, failed: false }
}

pub struct Fields<'a> {
    buf: &'a [u8],
    failed: bool,
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

impl<'a> Iterator for Fields<'a> {
    type Item = (Result<u64, String>, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() || self.failed {
            return None;
        }
        let mut fail = |m: &str| {
            self.failed = true;
            Some((Err(m.to_string()), None))
        };
        let Some(key) = varint(&mut self.buf) else {
            return fail("a truncated field key");
        };
        let (field, wire_type) = (key >> 3, key & 7);
        if field == 0 {
            return fail("field number 0");
        }
        let skip = |buf: &mut &'a [u8], n: usize| -> Option<&'a [u8]> {
            let (body, rest) = (buf.get(..n)?, buf.get(n..)?);
            *buf = rest;
            Some(body)
        };
        let body = match wire_type {
            0 => varint(&mut self.buf).map(|_| None),
            1 => skip(&mut self.buf, 8).map(|_| None),
            5 => skip(&mut self.buf, 4).map(|_| None),
            2 => match varint(&mut self.buf).and_then(|n| usize::try_from(n).ok()) {
                Some(n) => skip(&mut self.buf, n).map(Some),
                None => None,
            },
            _ => return fail("an unsupported wire type (groups are not used by REAPI)"),
        };
        match body {
            Some(body) => Some((Ok(field), body)),
            None => fail("a truncated field"),
        }
    }
}

/// How many fields `buf` has at its top level, and whether it parsed to the end.
pub fn count_fields(buf: &[u8]) -> (usize, bool) {
    let mut n = 0;
    for (field, _) in fields(buf) {
        if field.is_err() {
            return (n, false);
        }
        n += 1;
    }
    (n, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn walks_what_prost_encodes_and_stops_at_damage() {
        use bazel_remote_apis::build::bazel::remote::execution::v2::{
            command::EnvironmentVariable, Command,
        };
        let c = Command {
            arguments: vec!["a".into(), "bb".into(), String::new()],
            environment_variables: vec![EnvironmentVariable {
                name: "K".into(),
                value: "V".into(),
            }],
            working_directory: "w".into(),
            ..Default::default()
        };
        let raw = c.encode_to_vec();
        let seen: Vec<(u64, Option<&[u8]>)> = fields(&raw).map(|(f, b)| (f.unwrap(), b)).collect();
        assert_eq!(seen.len(), 5);
        assert_eq!(seen[0], (1, Some(&b"a"[..])));
        assert_eq!(seen[2], (1, Some(&b""[..])));
        assert_eq!(count_fields(&raw), (5, true));
        assert_eq!(count_fields(&raw[..raw.len() - 1]), (4, false));
        assert_eq!(
            count_fields(&[0x08, 0x96, 0x01]),
            (1, true),
            "a varint field"
        );
        assert_eq!(count_fields(&[0x0b]), (0, false), "a group is refused");
        assert_eq!(count_fields(&[0x00]), (0, false), "field 0 is refused");
    }
}
