//! sock_diag replies as steer reads them: `InetResponse::parse` of any
//! bytes (the payload of one inet_diag message), and a whole netlink
//! message as `Diag::parse` deserializes each, then `diag::decode`. What
//! decodes is consistent: addresses of the family it names, and the facts
//! `info` derives from it agree with it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, Parseable};
use netlink_packet_sock_diag::{SockDiagMessage, inet::InetResponse};
use steer::{
    discovery::diag::{self, DiagSocket},
    model::{Family, Protocol},
};

fn check(response: &InetResponse) {
    for protocol in Protocol::ALL {
        let Some(s) = diag::decode(response, protocol) else { continue };
        consistent(&s, protocol);
    }
}

fn consistent(s: &DiagSocket, protocol: Protocol) {
    assert_eq!(s.protocol, protocol);
    let v4 = s.family == Family::Ipv4;
    assert_eq!(s.local.is_ipv4(), v4, "{s:?}");
    assert!(s.remote.is_none_or(|r| r.is_ipv4() == v4), "{s:?}");
    let info = s.info(7);
    assert_eq!((info.family, info.protocol, info.cookie, info.netns_inode), (s.family, protocol, s.cookie, 7));
    assert_eq!(info.connected, s.remote.is_some());
    assert!(!info.listening || s.steerable());
    serde_json::to_string(s).expect("a socket prints as JSON");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(response) = InetResponse::parse(data) {
        check(&response);
    }
    if let Ok(message) = NetlinkMessage::<SockDiagMessage>::deserialize(data)
        && let NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) = message.payload
    {
        check(&response);
    }
});
