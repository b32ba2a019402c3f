//! Console output through the system device: [`print!`](crate::print) and
//! [`println!`](crate::println) format into a stack buffer and print it with one
//! `CONSOLE_ADDR`/`CONSOLE_LEN` pair (two exits) per call, or per 512 bytes.

use core::fmt::{self, Write};

use crate::sys;

const BUF_LEN: usize = 512;

/// A formatter that buffers and prints on [`LineWriter::flush`] or when full.
#[derive(Debug)]
pub struct LineWriter {
    buf: [u8; BUF_LEN],
    len: usize,
}

impl LineWriter {
    /// An empty writer.
    pub const fn new() -> Self {
        Self {
            buf: [0; BUF_LEN],
            len: 0,
        }
    }

    /// Prints what is buffered.
    pub fn flush(&mut self) {
        sys::console_write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Default for LineWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut bytes = s.as_bytes();
        while !bytes.is_empty() {
            if self.len == BUF_LEN {
                self.flush();
            }
            let n = bytes.len().min(BUF_LEN - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let mut w = LineWriter::new();
    // Writing into LineWriter never fails; a Display impl that fails just truncates the line.
    let _ = w.write_fmt(args);
    w.flush();
}

/// Prints to the VM console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the VM console.
#[macro_export]
macro_rules! println {
    () => { $crate::console::_print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
