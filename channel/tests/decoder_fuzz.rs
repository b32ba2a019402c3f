//! Arbitrary bytes fed to the frame decoder and to a live receiver: no panic, and nothing
//! that is not a valid, in-order record is ever delivered.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use ftvm_channel::frame::{self, Hello, Role};
use ftvm_channel::{Config, Receiver, Transport, TransportError};
use proptest::prelude::*;

/// A transport fed from a queue (what arrives) that records what is sent.
#[derive(Default, Clone)]
struct Scripted {
    inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
}

impl Transport for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn max_frame(&self) -> usize {
        1500
    }
    fn send(&mut self, _frame: &[u8]) -> Result<bool, TransportError> {
        Ok(true)
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
    fn poll_recv(&mut self, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        let frames: Vec<Vec<u8>> = self.inbox.lock().expect("inbox").drain(..).collect();
        for f in &frames {
            on_frame(f);
        }
        Ok(frames.len())
    }
}

fn hello() -> Vec<u8> {
    let mut b = Vec::new();
    let h = Hello {
        role: Role::Primary,
        max_frame: 1500,
        capacity: 1 << 16,
        max_payload: 100,
        seq: 1,
        executed: 0,
        digest: [0; 32],
    };
    frame::encode_hello(&mut b, 1, &h, b"settings");
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = frame::decode(&bytes);
        let _ = frame::peek_version_type(&bytes);
    }

    #[test]
    fn garbage_is_never_delivered(
        frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20),
        data_header in any::<bool>(),
    ) {
        let t = Scripted::default();
        t.inbox.lock().expect("inbox").push_back(hello());
        let (p, mut c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
        let mut r = Receiver::accept(Box::new(t.clone()), p, Config::default()).expect("handshake");
        for mut f in frames {
            if data_header && f.len() >= frame::HEADER_LEN {
                // Make it look like a DATA frame with a valid checksum, so that body checks
                // are exercised too.
                f[0..2].copy_from_slice(&frame::MAGIC.to_le_bytes());
                f[frame::VERSION_OFFSET] = frame::VERSION;
                f[frame::TYPE_OFFSET] = 3;
                f[frame::GENERATION_OFFSET..frame::GENERATION_OFFSET + 8].copy_from_slice(&1u64.to_le_bytes());
                let body = (f.len() - frame::HEADER_LEN) as u32;
                f[frame::BODY_LEN_OFFSET..frame::BODY_LEN_OFFSET + 4].copy_from_slice(&body.to_le_bytes());
                frame::finish(&mut f);
            }
            t.inbox.lock().expect("inbox").push_back(f);
        }
        r.poll().expect("poll");
        let batch = c.read();
        // Anything delivered must be a well-formed record with the expected sequence number.
        for (i, rec) in batch.records().enumerate() {
            let rec = rec.expect("well-formed record");
            prop_assert_eq!(rec.seq(), 1 + i as u64);
        }
        prop_assert_eq!(r.shared().stats.snapshot().records_delivered, batch.records().count() as u64);
    }
}
