//! A pickle protocol 2 writer limited to the opcodes torch's unpickler accepts.

/// Pickle opcodes (protocol 2) that [`Pickler`] emits.
pub mod op {
    /// `PROTO n`.
    pub const PROTO: u8 = 0x80;
    /// `GLOBAL module\nname\n`.
    pub const GLOBAL: u8 = b'c';
    /// Push a mark.
    pub const MARK: u8 = b'(';
    /// Build a tuple from items since the mark.
    pub const TUPLE: u8 = b't';
    /// Empty tuple.
    pub const EMPTY_TUPLE: u8 = b')';
    /// Empty list.
    pub const EMPTY_LIST: u8 = b']';
    /// Empty dict.
    pub const EMPTY_DICT: u8 = b'}';
    /// Set dict items from pairs since the mark.
    pub const SETITEMS: u8 = b'u';
    /// Append items since the mark to a list.
    pub const APPENDS: u8 = b'e';
    /// UTF-8 string with a 4-byte length.
    pub const BINUNICODE: u8 = b'X';
    /// Unsigned 1-byte int.
    pub const BININT1: u8 = b'K';
    /// Unsigned 2-byte int.
    pub const BININT2: u8 = b'M';
    /// Signed 4-byte int.
    pub const BININT: u8 = b'J';
    /// Long with a 1-byte length.
    pub const LONG1: u8 = 0x8a;
    /// Big-endian double.
    pub const BINFLOAT: u8 = b'G';
    /// `True`.
    pub const NEWTRUE: u8 = 0x88;
    /// `False`.
    pub const NEWFALSE: u8 = 0x89;
    /// `None`.
    pub const NONE: u8 = b'N';
    /// `cls.__new__(cls, *args)`.
    pub const NEWOBJ: u8 = 0x81;
    /// `obj.__setstate__(state)` / dict update.
    pub const BUILD: u8 = b'b';
    /// `callable(*args)`.
    pub const REDUCE: u8 = b'R';
    /// Persistent id from the stack.
    pub const BINPERSID: u8 = b'Q';
    /// End of pickle.
    pub const STOP: u8 = b'.';
    /// Store the top of the stack in memo slot (1-byte index).
    pub const BINPUT: u8 = b'q';
    /// Store the top of the stack in memo slot (4-byte index).
    pub const LONG_BINPUT: u8 = b'r';
    /// Push memo slot (1-byte index).
    pub const BINGET: u8 = b'h';
    /// Push memo slot (4-byte index).
    pub const LONG_BINGET: u8 = b'j';

    /// Every opcode above, for checking archives.
    pub const ALL: &[u8] = &[
        PROTO,
        GLOBAL,
        MARK,
        TUPLE,
        EMPTY_TUPLE,
        EMPTY_LIST,
        EMPTY_DICT,
        SETITEMS,
        APPENDS,
        BINUNICODE,
        BININT1,
        BININT2,
        BININT,
        LONG1,
        BINFLOAT,
        NEWTRUE,
        NEWFALSE,
        NONE,
        NEWOBJ,
        BUILD,
        REDUCE,
        BINPERSID,
        STOP,
        BINPUT,
        LONG_BINPUT,
        BINGET,
        LONG_BINGET,
    ];
}

/// Builds a pickle byte stream opcode by opcode.
#[derive(Debug, Default)]
pub struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    /// Starts a protocol 2 pickle.
    pub fn new() -> Self {
        Self {
            out: vec![op::PROTO, 2],
        }
    }

    /// Emits one raw opcode.
    pub fn op(&mut self, code: u8) -> &mut Self {
        self.out.push(code);
        self
    }

    /// `GLOBAL module name`.
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.out.push(op::GLOBAL);
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        self
    }

    /// A string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.out.push(op::BINUNICODE);
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self
    }

    /// An integer, in the shortest form torch's writer uses.
    pub fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.out.push(op::BININT1);
            self.out.push(v as u8);
        } else if (0..65536).contains(&v) {
            self.out.push(op::BININT2);
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(op::BININT);
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            self.out.push(op::LONG1);
            self.out.push(8);
            self.out.extend_from_slice(&v.to_le_bytes());
        }
        self
    }

    /// A float.
    pub fn float(&mut self, v: f64) -> &mut Self {
        self.out.push(op::BINFLOAT);
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A bool.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.op(if v { op::NEWTRUE } else { op::NEWFALSE })
    }

    /// A tuple of ints.
    pub fn int_tuple(&mut self, v: &[i64]) -> &mut Self {
        if v.is_empty() {
            return self.op(op::EMPTY_TUPLE);
        }
        self.op(op::MARK);
        for &x in v {
            self.int(x);
        }
        self.op(op::TUPLE)
    }

    /// Stores the top of the stack in memo slot `slot` (`BINPUT`), so [`Pickler::get`]
    /// pushes the same object again (tied tensors).
    pub fn put(&mut self, slot: u32) -> &mut Self {
        self.memo(op::BINPUT, op::LONG_BINPUT, slot)
    }

    /// Pushes the object stored in memo slot `slot` (`BINGET`).
    pub fn get(&mut self, slot: u32) -> &mut Self {
        self.memo(op::BINGET, op::LONG_BINGET, slot)
    }

    fn memo(&mut self, short: u8, long: u8, slot: u32) -> &mut Self {
        match u8::try_from(slot) {
            Ok(b) => self.out.extend([short, b]),
            Err(_) => {
                self.out.push(long);
                self.out.extend(slot.to_le_bytes());
            }
        }
        self
    }

    /// Ends the pickle and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(op::STOP);
        self.out
    }
}

/// Walks a pickle stream and returns its opcodes, failing on any opcode outside the
/// protocol-2 subset [`Pickler`] writes (used by tests to check archives).
pub fn opcodes(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut i = 0;
    let mut ops = Vec::new();
    let take = |i: &mut usize, n: usize| -> Result<(), String> {
        if *i + n > bytes.len() {
            return Err("truncated pickle".into());
        }
        *i += n;
        Ok(())
    };
    while i < bytes.len() {
        let code = bytes[i];
        i += 1;
        ops.push(code);
        match code {
            op::PROTO | op::BININT1 | op::BINPUT | op::BINGET => take(&mut i, 1)?,
            op::BININT2 => take(&mut i, 2)?,
            op::BININT | op::LONG_BINPUT | op::LONG_BINGET => take(&mut i, 4)?,
            op::BINFLOAT => take(&mut i, 8)?,
            op::LONG1 => {
                let n = *bytes.get(i).ok_or("truncated LONG1")? as usize;
                take(&mut i, 1 + n)?;
            }
            op::BINUNICODE => {
                let l = bytes.get(i..i + 4).ok_or("truncated BINUNICODE")?;
                let n = u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize;
                take(&mut i, 4 + n)?;
            }
            op::GLOBAL => {
                for _ in 0..2 {
                    let nl = bytes[i..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or("unterminated GLOBAL")?;
                    take(&mut i, nl + 1)?;
                }
            }
            op::STOP => {
                if i != bytes.len() {
                    return Err("bytes after STOP".into());
                }
                return Ok(ops);
            }
            c if op::ALL.contains(&c) => {}
            c => {
                return Err(format!(
                    "opcode 0x{c:02x} is outside ferry's protocol-2 subset"
                ));
            }
        }
    }
    Err("no STOP".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_use_shortest_forms() {
        let mut p = Pickler::new();
        p.int(5).int(300).int(-1).int(1 << 40);
        let b = p.finish();
        assert_eq!(&b[..2], &[0x80, 2]);
        assert_eq!(&b[2..4], &[op::BININT1, 5]);
        assert_eq!(&b[4..7], &[op::BININT2, 0x2c, 0x01]);
        assert_eq!(b[7], op::BININT);
        assert_eq!(b[12], op::LONG1);
        let ops = opcodes(&b).expect("valid");
        assert_eq!(ops.last(), Some(&op::STOP));
    }

    #[test]
    fn rejects_foreign_opcodes() {
        // SHORT_BINUNICODE (0x8c) is protocol 4.
        assert!(opcodes(&[0x80, 2, 0x8c, 1, b'a', b'.']).is_err());
        assert!(opcodes(&[0x80, 2, op::BININT]).is_err());
    }
}
