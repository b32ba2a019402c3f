//! Network configuration from the command line: `ip=<a.b.c.d>/<prefix>` (default
//! `10.0.2.15/24`) and `gw=<a.b.c.d>` (default `10.0.2.1`; `gw=none` for no default route).

use core::fmt;
use core::net::Ipv4Addr;

use ftvm_guest_rt::cmdline::Cmdline;
use smoltcp::wire::{Ipv4Address, Ipv4Cidr};

/// The default guest address.
pub const DEFAULT_IP: Ipv4Cidr = Ipv4Cidr::new(Ipv4Address::new(10, 0, 2, 15), 24);
/// The default gateway.
pub const DEFAULT_GW: Ipv4Address = Ipv4Address::new(10, 0, 2, 1);

/// The interface configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// Address and prefix of the interface.
    pub ip: Ipv4Cidr,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Address>,
}

/// A command-line network setting that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// `ip=` is not `a.b.c.d/prefix` with a prefix of at most 32.
    BadIp,
    /// `gw=` is not an IPv4 address or `none`.
    BadGateway,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadIp => write!(f, "ip= wants a.b.c.d/prefix"),
            Self::BadGateway => write!(f, "gw= wants a.b.c.d or none"),
        }
    }
}

fn parse_cidr(text: &str) -> Option<Ipv4Cidr> {
    let (addr, prefix) = text.split_once('/').unwrap_or((text, "24"));
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then(|| Ipv4Cidr::new(addr, prefix))
}

impl NetConfig {
    /// Reads `ip=` and `gw=`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the setting that does not parse.
    pub fn from_cmdline(cmd: &Cmdline<'_>) -> Result<Self, ConfigError> {
        let ip = match cmd.get("ip") {
            None => DEFAULT_IP,
            Some(text) => parse_cidr(text).ok_or(ConfigError::BadIp)?,
        };
        let gateway = match cmd.get("gw") {
            None => Some(DEFAULT_GW),
            Some("none") => None,
            Some(text) => Some(text.parse().map_err(|_| ConfigError::BadGateway)?),
        };
        Ok(Self { ip, gateway })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_explicit_values() {
        let c = NetConfig::from_cmdline(&Cmdline::new("port=1")).expect("defaults");
        assert_eq!(c.ip, DEFAULT_IP);
        assert_eq!(c.gateway, Some(DEFAULT_GW));
        let c = NetConfig::from_cmdline(&Cmdline::new("ip=192.168.7.2/16 gw=192.168.0.1"))
            .expect("valid");
        assert_eq!(c.ip, Ipv4Cidr::new(Ipv4Address::new(192, 168, 7, 2), 16));
        assert_eq!(c.gateway, Some(Ipv4Address::new(192, 168, 0, 1)));
        let c = NetConfig::from_cmdline(&Cmdline::new("ip=10.1.1.1 gw=none")).expect("valid");
        assert_eq!(c.ip.prefix_len(), 24);
        assert_eq!(c.gateway, None);
    }

    #[test]
    fn rejects_garbage() {
        let bad = |s| NetConfig::from_cmdline(&Cmdline::new(s));
        assert_eq!(bad("ip=10.0.2/24"), Err(ConfigError::BadIp));
        assert_eq!(bad("ip=10.0.2.15/33"), Err(ConfigError::BadIp));
        assert_eq!(bad("gw=router"), Err(ConfigError::BadGateway));
    }
}
