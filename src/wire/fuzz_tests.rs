//! Property tests: no byte sequence makes a parser panic, and what parses re-encodes to the
//! same bytes. These are the same inputs a fuzzer would throw at the proxy's first read.

use bytes::BytesMut;
use proptest::prelude::*;

use super::backend::{take_message, BackendMessage, MAX_AUTH_PHASE_MESSAGE};
use super::frontend::{
    parse_cancel_body, parse_header, parse_startup_body, sasl_mechanism, StartupParams,
};

proptest! {
    #[test]
    fn header_parser_never_panics(bytes in any::<[u8; 8]>()) {
        let _ = parse_header(bytes);
    }

    #[test]
    fn cancel_body_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(key) = parse_cancel_body(&body) {
            prop_assert_eq!(&key.to_request()[8..], &body[..]);
        }
    }

    #[test]
    fn startup_body_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_startup_body(0, &body);
    }

    #[test]
    fn message_framer_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some((tag, body))) = take_message(&mut buf, MAX_AUTH_PHASE_MESSAGE) {
            let _ = BackendMessage::parse(tag, &body);
            let _ = sasl_mechanism(&body);
        }
    }

    #[test]
    fn startup_messages_round_trip(
        // Distinct keys: a repeated key is refused (see the unit tests in frontend.rs).
        params in proptest::collection::btree_map("[a-z_]{1,12}", "[ -~]{0,24}", 0..6),
        user in "[a-z]{1,12}",
    ) {
        let mut all = vec![("user".to_string(), user)];
        all.extend(params.into_iter().filter(|(k, _)| k != "user"));
        let p = StartupParams { minor: 0, params: all };
        let bytes = p.encode();
        let mut h = [0u8; 8];
        h.copy_from_slice(&bytes[..8]);
        prop_assert!(parse_header(h).is_ok());
        prop_assert_eq!(parse_startup_body(0, &bytes[8..]).ok(), Some(p));
    }
}
