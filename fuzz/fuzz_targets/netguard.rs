//! The destination address guard (`proto::netguard`).
//!
//! Invariants: `Policy::check` never panics; an IPv4-mapped IPv6 address
//! (`::ffff:a.b.c.d`) is judged exactly as its IPv4 address; every
//! loopback, private (RFC 1918) and link-local address is refused by the
//! default policy; an allow-listed network opens exactly the addresses it
//! contains.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use proto::netguard::{Network, Policy};

fuzz_target!(|data: &[u8]| {
    let default = Policy::default();
    if data.len() >= 4 {
        let v4 = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        let direct = default.check(IpAddr::V4(v4));
        assert_eq!(direct.is_ok(), default.check(mapped).is_ok(), "{v4} and {mapped} judged differently");
        if v4.is_loopback() || v4.is_private() || v4.is_link_local() {
            assert!(direct.is_err(), "{v4} allowed");
        }
    }
    if data.len() >= 16 {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&data[..16]);
        let v6 = Ipv6Addr::from(octets);
        let _ = default.check(IpAddr::V6(v6));
        if v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80 || (v6.segments()[0] & 0xfe00) == 0xfc00 {
            assert!(default.check(IpAddr::V6(v6)).is_err(), "{v6} allowed");
        }
    }
    // An allow-list made from the input: it must open what it contains and
    // nothing the default refuses outside it.
    if data.len() >= 21 {
        let prefix = data[20] % 33;
        let base = Ipv4Addr::new(data[16], data[17], data[18], data[19]);
        let Ok(network) = format!("{base}/{prefix}").parse::<Network>() else { return };
        let policy = Policy { allowed: vec![network] };
        let probe = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
        let inside = network.contains(IpAddr::V4(probe));
        let verdict = policy.check(IpAddr::V4(probe)).is_ok();
        if inside {
            assert!(verdict, "{probe} inside {network} refused");
        } else {
            assert_eq!(verdict, default.check(IpAddr::V4(probe)).is_ok(), "{probe} outside {network} judged anew");
        }
    }
});
