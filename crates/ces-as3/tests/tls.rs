//! TLS to the BIG-IP is verified by default: a real TLS server on loopback with a certificate from a private CA.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use ces_as3::client::{Http, Request, Transport};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

struct Pki {
    ca_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    Pki { ca_pem: ca_cert.pem(), cert_der: cert.der().to_vec(), key_der: key.serialize_der() }
}

/// A TLS server that answers every request `200 {}`; returns its port.
fn serve(p: &Pki) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![p.cert_der.clone().into()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(p.key_der.clone().into()),
        )
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, stream);
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
    });
    port
}

fn get(http: &mut Http) -> Result<u16, String> {
    let req = Request { method: "GET", path: "/mgmt/shared/appsvcs/info".into(), body: None };
    http.send(&req, None).map(|r| r.status)
}

#[test]
fn the_certificate_is_verified_by_default_against_the_given_ca_and_only_skipped_when_asked() {
    let p = pki();
    let port = serve(&p);
    let url = format!("https://127.0.0.1:{port}");
    let dir = std::env::temp_dir().join(format!("ces-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = Duration::from_secs(5);

    // Default: the WebPKI roots do not know this CA.
    let e = get(&mut Http::new(&url, None, false, t).unwrap()).unwrap_err();
    assert!(e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"), "{e}");

    // The right CA: verified, and the request goes through.
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &p.ca_pem).unwrap();
    assert_eq!(get(&mut Http::new(&url, Some(&ca), false, t).unwrap()), Ok(200));

    // Another CA: refused.
    let other = dir.join("other.pem");
    std::fs::write(&other, pki().ca_pem).unwrap();
    assert!(get(&mut Http::new(&url, Some(&other), false, t).unwrap()).is_err());

    // By name: `localhost` is in the certificate as well.
    assert_eq!(get(&mut Http::new(&format!("https://localhost:{port}"), Some(&ca), false, t).unwrap()), Ok(200));

    // Only when asked for: no verification.
    assert_eq!(get(&mut Http::new(&url, Some(&other), true, t).unwrap()), Ok(200));

    // A CA file without a certificate is an error, not a silent fallback.
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    assert!(Http::new(&url, Some(&empty), false, t).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
