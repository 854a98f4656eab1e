//! Which addresses a destination may reach. Loopback, private, link-local,
//! cloud-metadata and other special-purpose addresses are refused unless the
//! operator allow-lists a network that holds them.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An IP network in CIDR notation, e.g. `127.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not a network like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{s:?} has a bad prefix length"))?
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for Network {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Network {
    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are judged as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why an address is refused, or `None` when it is public.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => v6(a),
    }
}

fn v4(a: Ipv4Addr) -> Option<&'static str> {
    let [o0, o1, o2, _] = a.octets();
    Some(match () {
        _ if a.is_loopback() => "loopback",
        _ if a.is_private() => "private",
        _ if a.is_link_local() => "link-local (cloud metadata lives here)",
        _ if a.is_unspecified() || o0 == 0 => "unspecified (\"this network\")",
        _ if a.is_broadcast() => "broadcast",
        _ if a.is_multicast() || o0 >= 240 => "multicast or reserved",
        _ if o0 == 100 && (64..128).contains(&o1) => "carrier-grade NAT (shared address space)",
        _ if o0 == 192 && o1 == 0 && o2 == 0 => "IETF protocol assignments",
        _ if a.is_documentation() => "documentation",
        _ if o0 == 198 && (18..20).contains(&o1) => "benchmarking",
        _ => return None,
    })
}

fn v6(a: Ipv6Addr) -> Option<&'static str> {
    let seg = a.segments();
    let s0 = seg[0];
    let embedded_v4 = || Ipv4Addr::new((seg[6] >> 8) as u8, seg[6] as u8, (seg[7] >> 8) as u8, seg[7] as u8);
    // IPv4-compatible (::a.b.c.d) and IPv4-translated (::ffff:0:a.b.c.d)
    // addresses carry an IPv4 address: judge that one.
    if seg[..6] == [0; 6] && !a.is_loopback() && !a.is_unspecified() {
        return v4(embedded_v4()).or(Some("IPv4-compatible (embeds an IPv4 address)"));
    }
    if seg[..4] == [0; 4] && seg[4] == 0xffff && seg[5] == 0 {
        return v4(embedded_v4()).or(Some("IPv4-translated (embeds an IPv4 address)"));
    }
    Some(match () {
        _ if a.is_loopback() => "loopback",
        _ if a.is_unspecified() => "unspecified",
        _ if a.is_multicast() => "multicast",
        _ if s0 & 0xfe00 == 0xfc00 => "unique local (private)",
        _ if s0 & 0xffc0 == 0xfe80 => "link-local",
        _ if s0 == 0x2001 && a.segments()[1] == 0x0db8 => "documentation",
        _ if s0 == 0x0064 && a.segments()[1] == 0xff9b => "NAT64",
        _ if s0 == 0x2002 => "6to4 (may embed a private IPv4 address)",
        _ if s0 == 0x2001 && seg[1] == 0 => "Teredo (may embed a private IPv4 address)",
        _ if s0 & 0xffc0 == 0xfec0 => "site-local (deprecated private)",
        _ => return None,
    })
}

/// The address policy: special-purpose addresses are refused unless inside
/// one of `allowed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    /// Networks allowed even though they are special-purpose.
    pub allowed: Vec<Network>,
}

impl Policy {
    /// Checks one address; `Err` says why it is refused.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        match special_purpose(ip) {
            Some(_) if self.allowed.iter().any(|n| n.contains(ip)) => Ok(()),
            Some(why) => {
                Err(format!("{ip} is a {why} address; destinations may not reach it unless an operator allow-lists it"))
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        Policy::default().check(s.parse().unwrap()).is_err()
    }

    #[test]
    fn special_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "::7f00:1",
            "::ffff:0:7f00:1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "fec0::1",
            "::8.8.8.8",
            "224.0.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::",
        ] {
            assert!(refused(a), "{a} should be refused");
        }
        for a in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"] {
            assert!(!refused(a), "{a} should be allowed");
        }
    }

    #[test]
    fn allow_list_opens_only_its_network() {
        let p = Policy { allowed: vec!["127.0.0.0/8".parse().unwrap()] };
        assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("::ffff:127.0.0.2".parse().unwrap()).is_ok());
        assert!(p.check("10.0.0.1".parse().unwrap()).is_err());
        assert!(p.check("::1".parse().unwrap()).is_err());
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("ten/8".parse::<Network>().is_err());
        assert_eq!("::1".parse::<Network>().unwrap().to_string(), "::1/128");
    }
}
