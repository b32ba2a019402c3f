//! The link-layer envelope: one channel frame per Ethernet frame.
//!
//! ```text
//!  0          6          12         14         16                       16 + len
//!  ┌──────────┬──────────┬──────────┬──────────┬────────────────────────┐
//!  │ dst MAC  │ src MAC  │ 0x88B5   │ len (BE) │ channel frame (len B)  │ [padding]
//!  └──────────┴──────────┴──────────┴──────────┴────────────────────────┘
//!   Ethernet header (14 B)           envelope (2 B)
//! ```
//!
//! EtherType `0x88B5` is IEEE 802's "local experimental" type: no real protocol uses it, so the
//! kernel stack ignores these frames and a mis-addressed one cannot be mistaken for IP traffic.
//! The 2-byte length makes the envelope independent of padding: a real NIC pads frames to the
//! 60-byte Ethernet minimum, and the padding must not reach the channel's frame decoder. All
//! protocol checks (magic, version, CRC, sequence numbers) belong to the channel's frame layer;
//! this layer only rejects what is not ours (wrong EtherType) or cannot be ours (too short, or
//! shorter than its length field says).

/// The EtherType carrying channel frames (IEEE local experimental 1).
pub const ETHERTYPE_FTVM: u16 = 0x88B5;
/// Offset of the destination MAC.
pub const DST_OFFSET: usize = 0;
/// Offset of the source MAC.
pub const SRC_OFFSET: usize = 6;
/// Offset of the EtherType (big-endian).
pub const ETHERTYPE_OFFSET: usize = 12;
/// Length of the Ethernet header (no VLAN tag, no FCS: the NIC strips and adds the FCS).
pub const ETH_HEADER_LEN: usize = 14;
/// Offset of the channel frame's length (big-endian u16).
pub const LEN_OFFSET: usize = ETH_HEADER_LEN;
/// Offset of the channel frame.
pub const PAYLOAD_OFFSET: usize = LEN_OFFSET + 2;
/// Bytes in front of the channel frame.
pub const OVERHEAD: usize = PAYLOAD_OFFSET;
/// The broadcast MAC (used as destination when the peer's MAC is not configured).
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// Why a received Ethernet frame was not handed to the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Shorter than the envelope, or shorter than its length field says.
    Short,
    /// Not EtherType [`ETHERTYPE_FTVM`].
    WrongEtherType,
}

/// The 16-byte envelope header for frames from `src` to `dst` (length field left zero).
#[must_use]
pub fn header_template(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> [u8; OVERHEAD] {
    let mut h = [0u8; OVERHEAD];
    h[DST_OFFSET..DST_OFFSET + 6].copy_from_slice(&dst);
    h[SRC_OFFSET..SRC_OFFSET + 6].copy_from_slice(&src);
    h[ETHERTYPE_OFFSET..ETHERTYPE_OFFSET + 2].copy_from_slice(&ethertype.to_be_bytes());
    h
}

/// Writes `template` with the length of `payload` and then `payload` into `out`; returns the
/// Ethernet frame's length. `None` when `out` is too small or `payload` longer than `u16::MAX`.
#[must_use]
pub fn encode(template: &[u8; OVERHEAD], payload: &[u8], out: &mut [u8]) -> Option<usize> {
    let len = u16::try_from(payload.len()).ok()?;
    let total = OVERHEAD + payload.len();
    let out = out.get_mut(..total)?;
    out[..OVERHEAD].copy_from_slice(template);
    out[LEN_OFFSET..PAYLOAD_OFFSET].copy_from_slice(&len.to_be_bytes());
    out[PAYLOAD_OFFSET..].copy_from_slice(payload);
    Some(total)
}

/// The channel frame inside a received Ethernet frame, or why there is none.
///
/// # Errors
/// [`Reject`] for frames that are not ours or are truncated.
pub fn decode(eth: &[u8], ethertype: u16) -> Result<&[u8], Reject> {
    if eth.len() < OVERHEAD {
        return Err(Reject::Short);
    }
    if eth[ETHERTYPE_OFFSET..ETHERTYPE_OFFSET + 2] != ethertype.to_be_bytes() {
        return Err(Reject::WrongEtherType);
    }
    let len = usize::from(u16::from_be_bytes([eth[LEN_OFFSET], eth[LEN_OFFSET + 1]]));
    eth.get(PAYLOAD_OFFSET..PAYLOAD_OFFSET + len)
        .ok_or(Reject::Short)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let t = header_template(BROADCAST, [2, 0, 0, 0, 0, 1], ETHERTYPE_FTVM);
        let mut buf = [0u8; 64];
        let n = encode(&t, b"hello", &mut buf).expect("fits");
        assert_eq!(n, OVERHEAD + 5);
        assert_eq!(&buf[12..16], &[0x88, 0xB5, 0, 5]);
        // Padded to the Ethernet minimum: the padding is not part of the payload.
        assert_eq!(decode(&buf[..60], ETHERTYPE_FTVM), Ok(&b"hello"[..]));
        assert_eq!(decode(&buf[..n], ETHERTYPE_FTVM), Ok(&b"hello"[..]));
    }

    #[test]
    fn rejects() {
        let t = header_template(BROADCAST, BROADCAST, ETHERTYPE_FTVM);
        let mut buf = [0u8; 64];
        let n = encode(&t, b"hello", &mut buf).expect("fits");
        assert_eq!(decode(&buf[..n - 1], ETHERTYPE_FTVM), Err(Reject::Short));
        assert_eq!(decode(&buf[..10], ETHERTYPE_FTVM), Err(Reject::Short));
        assert_eq!(decode(&buf[..n], 0x0800), Err(Reject::WrongEtherType));
        assert!(
            encode(&t, &[0u8; 60], &mut buf).is_none(),
            "too small a buffer"
        );
    }
}
