//! Cancel keys as a replica of a fleet hands them out: Postgres' process id unchanged (so
//! `pg_backend_pid()` matches what the client holds), a secret of the backend's length whose
//! first byte is the replica's id and whose other bytes are random. The backend's own secret
//! never leaves the proxy; the session registry maps one to the other.

use rand::RngCore;

use crate::wire::frontend::CancelKey;

/// The replica a client-visible key names. Only meaningful in a fleet: a single node hands
/// out Postgres' own keys, whose first byte is anything.
pub fn replica_of(key: &CancelKey) -> u8 {
    key.secret().first().copied().unwrap_or(0)
}

/// A fresh client-visible key for `real`, tagged with `replica_id`.
pub fn client_key(replica_id: u8, real: &CancelKey) -> CancelKey {
    let mut secret = [0u8; crate::wire::frontend::MAX_CANCEL_SECRET];
    let secret = &mut secret[..real.secret().len()];
    rand::rng().fill_bytes(secret);
    secret[0] = replica_id;
    // `secret` has the length of a key that parsed, so this holds; were it ever not to, the
    // session keeps no cancel key rather than get one that routes nowhere.
    CancelKey::new(real.process_id(), secret).unwrap_or_else(|| real.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_key_keeps_its_pid_and_length_and_names_the_replica() {
        let real = CancelKey::new(4242, &[9, 8, 7, 6]).unwrap();
        let k = client_key(3, &real);
        assert_eq!(k.process_id(), 4242);
        assert_eq!(k.secret().len(), 4);
        assert_eq!(replica_of(&k), 3);
        assert!(matches!(k, CancelKey::Short { .. }));
        // Fresh randomness each time: two sessions never share a visible key by design.
        let others: std::collections::HashSet<_> = (0..64).map(|_| client_key(3, &real)).collect();
        assert!(others.len() > 60);
    }

    #[test]
    fn a_protocol_32_key_keeps_its_length_and_hides_the_real_secret() {
        let secret: Vec<u8> = (0u8..32).collect();
        let real = CancelKey::new(7, &secret).unwrap();
        let k = client_key(255, &real);
        assert_eq!(k.secret().len(), 32);
        assert_eq!(replica_of(&k), 255);
        assert_eq!(k.process_id(), 7);
        assert_ne!(&k.secret()[1..], &secret[1..]);
        let longest = CancelKey::new(7, &[1u8; 256]).unwrap();
        assert_eq!(client_key(1, &longest).secret().len(), 256);
    }

    #[test]
    fn encode_and_decode_round_trip_through_the_cancel_request() {
        let real = CancelKey::new(99, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let k = client_key(2, &real);
        let req = k.to_request();
        let parsed = CancelKey::new(
            u32::from_be_bytes(req[8..12].try_into().unwrap()),
            &req[12..],
        )
        .unwrap();
        assert_eq!(parsed, k);
        assert_eq!(replica_of(&parsed), 2);
    }
}
