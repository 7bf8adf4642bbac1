use super::*;

fn subject(kind: PrincipalKind, name: &str, roles: &[&str]) -> Subject {
    Subject {
        kind,
        name: name.into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
    }
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
}

#[test]
fn a_ca_issues_identities_that_load_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let ca = Ca::init(&ca_dir, "physics", 30).expect("init");
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    assert_eq!(mode(&ca_dir.join("ca.crt")), 0o644);
    let again = Ca::init(&ca_dir, "physics", 30).expect_err("exists");
    assert!(
        matches!(&again, PkiError::Exists(p) if p.ends_with("ca.crt")),
        "{again:?}"
    );
    assert!(again.to_string().contains("already exists"), "{again}");
    let ca2 = Ca::load(&ca_dir).expect("load");
    assert_eq!(ca2.domain(), "physics");
    assert_eq!(ca2.cert_pem(), ca.cert_pem());

    let out = dir.path().join("alice");
    let p = ca2
        .issue(
            &subject(PrincipalKind::User, "alice", &["researcher", "member"]),
            &out,
            None,
            10,
        )
        .expect("issue");
    assert_eq!(p.roles, ["member", "researcher"]);
    assert_eq!(mode(&out.join("key")), 0o600);
    let c = Credentials::load(&out, &[]).expect("loads");
    assert_eq!(c.principal, p);
    assert_eq!(c.principal.domain, "physics");
    let e = ca2
        .issue(&subject(PrincipalKind::User, "alice", &[]), &out, None, 10)
        .expect_err("exists");
    assert!(
        matches!(&e, PkiError::Exists(p) if p.ends_with("cert.pem")),
        "{e:?}"
    );
    assert!(e.to_string().contains("already exists"), "{e}");

    // Certifying an existing key keeps it.
    let node_dir = dir.path().join("n1");
    std::fs::create_dir_all(&node_dir).expect("mkdir");
    let key = Keypair::generate_ed25519();
    std::fs::write(
        node_dir.join("key"),
        key.to_protobuf_encoding().expect("encode"),
    )
    .expect("key");
    ca2.issue(
        &subject(PrincipalKind::Node, "n1", &["superpeer"]),
        &node_dir,
        Some(&node_dir.join("key")),
        10,
    )
    .expect("issue for an existing key");
    let c = Credentials::load(&node_dir, &[]).expect("loads");
    assert_eq!(c.peer(), key.public().to_peer_id());
    assert_eq!(c.principal.kind, PrincipalKind::Node);

    let bad = ca2
        .issue(
            &subject(PrincipalKind::User, "../x", &[]),
            &dir.path().join("x"),
            None,
            1,
        )
        .expect_err("bad name");
    assert!(
        matches!(&bad, PkiError::Name { field: "the name", value } if value == "../x"),
        "{bad:?}"
    );
    assert!(bad.to_string().contains("a name is"), "{bad}");
}

#[test]
fn every_bad_certificate_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let physics = Ca::init(&dir.path().join("p"), "physics", 30).expect("init");
    let biology = Ca::init(&dir.path().join("b"), "biology", 30).expect("init");
    let mut trust = Trust::default();
    trust.add_pem(physics.cert_pem()).expect("anchor");
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let alice = subject(PrincipalKind::User, "alice", &["researcher"]);
    let der = |pem: String| parse_pem(&pem).expect("pem");

    let good = der(physics.certify(&alice, &key.public(), 1).expect("certify"));
    let p = trust.verify(&good, &peer).expect("valid");
    assert_eq!((p.name.as_str(), p.domain.as_str()), ("alice", "physics"));

    let foreign = der(biology.certify(&alice, &key.public(), 1).expect("certify"));
    let e = trust.verify(&foreign, &peer).expect_err("unknown CA");
    assert!(
        matches!(&e, AuthError::UnknownCa { trusted, .. } if trusted == &["physics"]),
        "{e:?}"
    );
    assert!(e.to_string().contains("unknown CA"), "{e}");

    let now = time::OffsetDateTime::now_utc();
    let expired = der(physics
        .certify_between(
            &alice,
            &key.public(),
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .expect("certify"));
    let e = trust.verify(&expired, &peer).expect_err("expired");
    assert!(matches!(e, AuthError::Validity { .. }), "{e:?}");
    assert!(e.to_string().contains("not valid now"), "{e}");

    let mut tampered = good.clone();
    // Flip a byte inside the name "alice" in the subject: the signature no longer covers it.
    let at = tampered
        .windows(5)
        .position(|w| w == b"alice")
        .expect("the name is in the DER");
    tampered[at] = b'A';
    let e = trust.verify(&tampered, &peer).expect_err("tampered");
    assert_eq!(e, AuthError::Signature("physics".into()));
    assert!(e.to_string().contains("does not verify"), "{e}");

    let other = Keypair::generate_ed25519().public().to_peer_id();
    let e = trust.verify(&good, &other).expect_err("not bound");
    assert_eq!(
        e,
        AuthError::OtherPeer {
            bound: Box::new(peer),
            peer: Box::new(other)
        }
    );
    assert!(e.to_string().contains("bound to peer"), "{e}");

    let e = trust.verify(b"garbage", &peer).expect_err("garbage");
    assert!(matches!(e, AuthError::Der(_)), "{e:?}");
    assert!(e.to_string().contains("not an X.509"), "{e}");

    // A CA certificate does not identify a peer, and a non-CA is no anchor.
    let e = trust
        .verify(&der(physics.cert_pem().to_owned()), &peer)
        .expect_err("a CA");
    assert_eq!(e, AuthError::Ca);
    let leaf_pem = physics.certify(&alice, &key.public(), 1).expect("certify");
    assert_eq!(
        Trust::default().add_pem(&leaf_pem),
        Err(crate::pki::TrustError::NotCa)
    );
}

/// Through real sockets: a daemon's swarm refuses every bad certificate before it hands any
/// request on, and a client refuses a daemon whose CA it does not trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_refuses_bad_certificates_before_any_request() {
    use crate::net::{Net, NetConfig};
    use crate::proto::Request;
    let dir = tempfile::tempdir().expect("tempdir");
    let physics = Ca::init(&dir.path().join("p"), "physics", 30).expect("init");
    let biology = Ca::init(&dir.path().join("b"), "biology", 30).expect("init");
    let node = subject(PrincipalKind::Node, "sp", &["superpeer"]);
    let alice = subject(PrincipalKind::User, "alice", &["researcher"]);
    let config = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        ..NetConfig::default()
    };
    let server_creds = Credentials::ephemeral(&physics, &node).expect("creds");
    let (server, mut inbound) = Net::start(&server_creds, &config).await.expect("server");
    let addrs = server.addrs().to_vec();

    let good = Credentials::ephemeral(&physics, &alice).expect("creds");
    let der = |pem: String| parse_pem(&pem).expect("pem");
    let mut expired = good.clone();
    let now = time::OffsetDateTime::now_utc();
    expired.cert = der(physics
        .certify_between(
            &alice,
            &good.key.public(),
            now - time::Duration::days(9),
            now - time::Duration::days(2),
        )
        .expect("certify"));
    let mut tampered = good.clone();
    let at = tampered
        .cert
        .windows(5)
        .position(|w| w == b"alice")
        .expect("name");
    tampered.cert[at] = b'A';
    let mut foreign = Credentials::ephemeral(&biology, &alice).expect("creds");
    foreign
        .trust
        .add_pem(physics.cert_pem())
        .expect("trusts physics");
    let mut unbound = good.clone();
    unbound.key = Keypair::generate_ed25519();

    for (what, creds, reason) in [
        ("expired", &expired, "not valid now"),
        ("tampered", &tampered, "does not verify"),
        ("unknown CA", &foreign, "unknown CA"),
        ("not bound", &unbound, "bound to peer"),
    ] {
        let (client, _) = Net::start(creds, &NetConfig::default())
            .await
            .expect("client");
        let e = client
            .request(server.peer(), &addrs, Request::Group)
            .await
            .expect_err(what);
        assert!(e.to_string().contains(reason), "{what}: {e}");
        assert!(server.identity(&client.peer()).is_none(), "{what}");
    }
    assert!(
        inbound.try_recv().is_err(),
        "no refused request reached the daemon"
    );

    // A good certificate passes both ways, and the request arrives with who sent it.
    let (client, _) = Net::start(&good, &NetConfig::default())
        .await
        .expect("client");
    let ask = tokio::spawn({
        let client = client.clone();
        let peer = server.peer();
        async move { client.request(peer, &addrs, Request::Group).await }
    });
    let req = tokio::time::timeout(std::time::Duration::from_secs(10), inbound.recv())
        .await
        .expect("in time")
        .expect("a request");
    assert_eq!(req.principal.name, "alice");
    assert_eq!(req.principal.domain, "physics");
    req.reply(crate::proto::Response::Ok).await;
    assert!(matches!(
        ask.await.expect("join"),
        Ok(crate::proto::Response::Ok)
    ));
    assert_eq!(
        client.identity(&server_creds.peer()).map(|p| p.name),
        Some("sp".to_owned())
    );

    // A client that does not trust the daemon's CA refuses it (the daemon accepted the
    // client's certificate, and answered with its own).
    let mut wary = Credentials::ephemeral(&physics, &alice).expect("creds");
    wary.trust = Trust::default();
    wary.trust.add_pem(biology.cert_pem()).expect("anchor");
    let (client, _) = Net::start(&wary, &NetConfig::default())
        .await
        .expect("client");
    let e = client
        .request(server_creds.peer(), server.addrs(), Request::Group)
        .await
        .expect_err("the daemon's CA is unknown to the client");
    assert!(e.to_string().contains("unknown CA"), "{e}");
}

#[test]
fn a_bad_file_is_named_with_what_is_wrong_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let ca = Ca::init(&ca_dir, "physics", 30).expect("init");
    let out = dir.path().join("alice");
    ca.issue(&subject(PrincipalKind::User, "alice", &[]), &out, None, 1)
        .expect("issue");
    std::fs::write(out.join("key"), b"not a key").expect("write");
    let e = Credentials::load(&out, &[]).expect_err("bad key");
    assert!(
        matches!(&e, PkiError::File { path, error: FileError::Key(_) } if *path == out.join("key")),
        "{e:?}"
    );
    assert!(e.to_string().contains("key: not a libp2p key"), "{e}");
    // Another CA's key next to this CA's certificate.
    let other = dir.path().join("other");
    Ca::init(&other, "physics", 30).expect("init");
    std::fs::copy(other.join("ca.key"), ca_dir.join("ca.key")).expect("copy");
    let e = Ca::load(&ca_dir).expect_err("mismatch");
    assert!(
        matches!(
            &e,
            PkiError::File {
                error: FileError::KeyMismatch,
                ..
            }
        ),
        "{e:?}"
    );
    let e = Credentials::load(&dir.path().join("nobody"), &[]).expect_err("none");
    assert!(matches!(e, PkiError::NoCertificate { .. }), "{e:?}");
}

#[test]
fn a_revoked_certificate_is_refused_once_its_list_is_taken_and_lists_cannot_be_forged_or_rolled_back()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let ca = Ca::init(&ca_dir, "physics", 30).expect("init");
    let issue = |name: &str| {
        let out = dir.path().join(name);
        ca.issue(&subject(PrincipalKind::User, name, &[]), &out, None, 10)
            .expect("issue");
        let c = Credentials::load(&out, &[]).expect("loads");
        let pem = std::fs::read_to_string(out.join("cert.pem")).expect("cert");
        (c, pem)
    };
    let (alice, alice_pem) = issue("alice");
    let (bob, _) = issue("bob");
    // The daemon's trust, and a clone of it (as the certificate exchange holds one).
    let trust = alice.trust.clone();
    let exchange = trust.clone();
    assert!(exchange.verify(&alice.cert, &alice.peer()).is_ok());

    let serial = serial_of(&alice_pem).expect("serial");
    let r = ca.revoke(&ca_dir, &serial).expect("revoke");
    assert_eq!((r.number, r.count, r.already), (1, 1, false));
    let crl_path = ca_dir.join(CRL_FILE);
    assert_eq!(mode(&crl_path), 0o644);
    let first = crl_der(&std::fs::read_to_string(&crl_path).expect("crl")).expect("PEM");
    let taken = trust.adopt_crl(&first).expect("valid").expect("newer");
    assert_eq!((taken.domain.as_str(), taken.number), ("physics", 1));
    // Every clone refuses alice now, and still takes bob.
    let e = exchange
        .verify(&alice.cert, &alice.peer())
        .expect_err("revoked");
    assert!(
        matches!(&e, AuthError::Revoked { domain, serial: s } if domain == "physics" && *s == hex::encode(&serial)),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("revoked by the CA of domain physics"),
        "{e}"
    );
    assert!(exchange.verify(&bob.cert, &bob.peer()).is_ok());
    assert_eq!(trust.crl_numbers().get("physics"), Some(&1));

    // A second revocation: list 2 holds both; revoking again writes list 3, still both.
    let bob_serial =
        serial_of(&std::fs::read_to_string(dir.path().join("bob/cert.pem")).expect("cert"))
            .expect("serial");
    assert_eq!(ca.revoke(&ca_dir, &bob_serial).expect("revoke").count, 2);
    let again = ca.revoke(&ca_dir, &serial).expect("revoke again");
    assert_eq!((again.number, again.count, again.already), (3, 2, true));
    let third = crl_der(&std::fs::read_to_string(&crl_path).expect("crl")).expect("PEM");
    assert!(trust.adopt_crl(&third).expect("valid").is_some());
    assert!(exchange.verify(&bob.cert, &bob.peer()).is_err());
    // An older list is not taken back (no rollback), nor the same one twice.
    assert_eq!(trust.adopt_crl(&first).expect("valid"), None);
    assert_eq!(trust.adopt_crl(&third).expect("valid"), None);
    assert!(exchange.verify(&bob.cert, &bob.peer()).is_err());

    // A list with a flipped byte, one of another CA of the same domain, and garbage: refused.
    let mut forged = third.clone();
    let at = forged.len() - 10;
    forged[at] ^= 1;
    let mut fresh = Trust::default();
    fresh.add_pem(ca.cert_pem()).expect("trust");
    assert!(matches!(
        fresh.adopt_crl(&forged),
        Err(CrlError::Signature(_) | CrlError::Der(_))
    ));
    let other_dir = dir.path().join("other");
    let other = Ca::init(&other_dir, "physics", 30).expect("init");
    other.revoke(&other_dir, &serial).expect("revoke");
    let other_crl =
        crl_der(&std::fs::read_to_string(other_dir.join(CRL_FILE)).expect("crl")).expect("PEM");
    assert!(matches!(
        fresh.adopt_crl(&other_crl),
        Err(CrlError::Signature(_))
    ));
    assert!(fresh.verify(&alice.cert, &alice.peer()).is_ok());
    assert!(matches!(fresh.adopt_crl(b"junk"), Err(CrlError::Der(_))));
    assert!(matches!(crl_der("junk"), Err(CrlError::Pem(_))));
    assert!(matches!(
        crl_der(ca.cert_pem()),
        Err(CrlError::Label(l)) if l == "CERTIFICATE"
    ));
    // Another domain's CA, not trusted here: unknown.
    let bio_dir = dir.path().join("bio");
    let bio = Ca::init(&bio_dir, "biology", 30).expect("init");
    bio.revoke(&bio_dir, &serial).expect("revoke");
    let bio_crl =
        crl_der(&std::fs::read_to_string(bio_dir.join(CRL_FILE)).expect("crl")).expect("PEM");
    assert!(matches!(
        fresh.adopt_crl(&bio_crl),
        Err(CrlError::UnknownCa(_))
    ));
}
