//! Certificates for operators who have none (`phaul cert`): a CA, host certificates it signs (each valid as a
//! server and as a client, for a DNS name and optional IP addresses), and a revocation list.
//!
//! Layout of a certificate directory: `ca.pem`, `ca.key`, `NAME.pem` + `NAME.key` per host, `crl.pem`. Keys are
//! written mode 0600; nothing is ever overwritten.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "{0} exists already; phaul cert never overwrites a key or certificate (remove it first, or pick another name)"
    )]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}; is {dir} a directory made by `phaul cert ca`?", dir = path.parent().unwrap_or(Path::new(".")).display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0:?} is not a host name phaul can put in a certificate (letters, digits, '-' and '.')")]
    BadName(String),
    #[error("making the certificate failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path} is not a certificate phaul can read: {detail}")]
    Parse { path: PathBuf, detail: String },
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CertError> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            CertError::Write { path: path.to_path_buf(), source }
        }
    })?;
    f.write_all(text.as_bytes()).map_err(|source| CertError::Write { path: path.to_path_buf(), source })
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read { path: path.to_path_buf(), source })
}

fn check_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if ok {
        Ok(())
    } else {
        Err(CertError::BadName(name.into()))
    }
}

fn random_serial() -> Result<SerialNumber, CertError> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| CertError::Parse { path: "/dev/urandom".into(), detail: "no randomness".into() })?;
    b[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&b))
}

/// Creates `dir` (0700) with a new CA: `ca.pem`, `ca.key`.
pub fn new_ca(dir: &Path, name: &str) -> Result<(), CertError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Write { path: dir.to_path_buf(), source })?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.serial_number = Some(random_serial()?);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    let cert = p.self_signed(&key)?;
    write_new(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
    write_new(&dir.join("ca.pem"), &cert.pem(), 0o644)
}

fn load_ca(dir: &Path) -> Result<(rcgen::Certificate, KeyPair), CertError> {
    let key_path = dir.join("ca.key");
    let key = KeyPair::from_pem(&read(&key_path)?)
        .map_err(|e| CertError::Parse { path: key_path.clone(), detail: e.to_string() })?;
    let cert_path = dir.join("ca.pem");
    let params = CertificateParams::from_ca_cert_pem(&read(&cert_path)?)
        .map_err(|e| CertError::Parse { path: cert_path.clone(), detail: e.to_string() })?;
    // Signing again with the same key and name gives an issuer identical to the one on disk.
    let ca = params.self_signed(&key)?;
    Ok((ca, key))
}

/// A host certificate signed by the CA in `ca_dir`, valid as a server and as a client for `name` (and `ips`),
/// written as `out/NAME.pem` and `out/NAME.key`.
pub fn new_host(ca_dir: &Path, name: &str, ips: &[IpAddr], out: &Path) -> Result<(PathBuf, PathBuf), CertError> {
    check_name(name)?;
    let (ca, ca_key) = load_ca(ca_dir)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![name.to_string()])?;
    for ip in ips {
        p.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.serial_number = Some(random_serial()?);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(825);
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(|source| CertError::Write { path: out.to_path_buf(), source })?;
    let (cp, kp) = (out.join(format!("{name}.pem")), out.join(format!("{name}.key")));
    write_new(&kp, &key.serialize_pem(), 0o600)?;
    write_new(&cp, &cert.pem(), 0o644)?;
    Ok((cp, kp))
}

/// Adds the certificate `cert` to the CA's revocation list (`ca_dir/crl.pem`, made anew with every revoked
/// serial); returns its path.
pub fn revoke(ca_dir: &Path, cert: &Path) -> Result<PathBuf, CertError> {
    let (ca, ca_key) = load_ca(ca_dir)?;
    let serial = serial_of(cert)?;
    let list = ca_dir.join("revoked.txt");
    let mut serials: Vec<String> =
        fs::read_to_string(&list).map(|t| t.lines().map(str::to_string).collect()).unwrap_or_default();
    let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
    if !serials.contains(&hex) {
        serials.push(hex);
    }
    let now = time::OffsetDateTime::now_utc();
    let revoked = serials
        .iter()
        .filter_map(|h| {
            let bytes: Option<Vec<u8>> =
                (0..h.len() / 2).map(|i| u8::from_str_radix(h.get(i * 2..i * 2 + 2)?, 16).ok()).collect();
            bytes
        })
        .map(|b| RevokedCertParams {
            serial_number: SerialNumber::from_slice(&b),
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        })
        .collect();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(30),
        crl_number: SerialNumber::from(now.unix_timestamp() as u64),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca, &ca_key)?;
    let path = ca_dir.join("crl.pem");
    let tmp = ca_dir.join("crl.pem.tmp");
    fs::write(&tmp, crl.pem()?).map_err(|source| CertError::Write { path: tmp.clone(), source })?;
    fs::rename(&tmp, &path).map_err(|source| CertError::Write { path: path.clone(), source })?;
    fs::write(&list, serials.join("\n") + "\n").map_err(|source| CertError::Write { path: list.clone(), source })?;
    Ok(path)
}

fn serial_of(cert: &Path) -> Result<Vec<u8>, CertError> {
    let text = read(cert)?;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(text.as_bytes())
        .map_err(|e| CertError::Parse { path: cert.into(), detail: e.to_string() })?;
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CertError::Parse { path: cert.into(), detail: e.to_string() })?;
    Ok(c.tbs_certificate.raw_serial().to_vec())
}
