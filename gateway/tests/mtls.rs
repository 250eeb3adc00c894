//! Mutual TLS: a device whose client certificate names its thing needs no token.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::{Harness, device_config, within};
use thingport_device::{
    Device, DeviceError, Endpoint, FrameConn, Identity, Transport, tls_config_with_identity,
};
use thingport_protocol::{Credential, ErrorCode, SessionError};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

fn identity(ca: &Ca, thing: &str) -> Identity {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![thing.to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, thing);
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (vec![CertificateDer::from(cert.der().to_vec())], key)
}

fn endpoint(harness: &Harness, transport: Transport, identity: Option<Identity>) -> Endpoint {
    let mut endpoint = harness.endpoint(transport);
    let trusted = std::slice::from_ref(&harness.cert);
    let copy = identity.as_ref().map(|(chain, key)| (chain.clone(), key.clone_key()));
    endpoint.wss_tls = tls_config_with_identity(trusted, b"http/1.1", copy).unwrap();
    endpoint.quic_tls =
        tls_config_with_identity(trusted, thingport_protocol::QUIC_ALPN, identity).unwrap();
    endpoint
}

#[tokio::test]
async fn client_certificates_name_their_thing() {
    let devices = ca("devices");
    let stranger = ca("stranger");
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("devices-ca.pem");
    std::fs::write(&ca_file, &devices.pem).unwrap();
    let harness = Harness::start(1, |c| c.tls.client_ca = Some(ca_file.clone())).await;

    for transport in [Transport::Wss, Transport::Quic] {
        // the certificate names pump-9: no token needed
        let mut device = Device::new(device_config("pump-9", Credential::None), 1);
        let with_cert = endpoint(&harness, transport, Some(identity(&devices, "pump-9")));
        within("connect", device.connect(&with_cert)).await.unwrap();
        device.disconnect().await;

        // the certificate names another thing
        let mut device = Device::new(device_config("pump-10", Credential::None), 1);
        match within("refusal", device.connect(&with_cert)).await {
            Err(DeviceError::Session(SessionError::Peer { code, .. })) => {
                assert_eq!(code, ErrorCode::THING_NOT_ALLOWED)
            }
            other => panic!("{other:?}"),
        }

        // a certificate from a CA the gateway does not trust fails the TLS handshake
        let foreign = endpoint(&harness, transport, Some(identity(&stranger, "pump-9")));
        let refused = within("foreign certificate", async {
            let mut conn = FrameConn::connect(&foreign).await?;
            // TLS 1.3 reports a refused client certificate after the client's handshake completes
            conn.send(&[thingport_protocol::Frame::Ping { nonce: 1 }.to_bytes()]).await?;
            match conn.recv().await? {
                Ok(_) => anyhow::Ok(false),
                Err(_) => anyhow::Ok(true),
            }
        })
        .await;
        assert!(!matches!(refused, Ok(false)), "a foreign certificate was accepted");
    }

    // without a certificate a token still works
    let mut device = harness.device("pump-11");
    within("token", device.connect(&endpoint(&harness, Transport::Wss, None))).await.unwrap();
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn required_client_certificates_refuse_devices_without_one() {
    let devices = ca("devices");
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("devices-ca.pem");
    std::fs::write(&ca_file, &devices.pem).unwrap();
    let harness = Harness::start(1, |c| {
        c.tls.client_ca = Some(ca_file.clone());
        c.tls.require_client_cert = true;
    })
    .await;
    let mut device = harness.device("pump-1");
    let result = within("refusal", device.connect(&endpoint(&harness, Transport::Wss, None))).await;
    assert!(result.is_err(), "a device without a certificate was admitted");
    harness.stop().await.unwrap();
}
