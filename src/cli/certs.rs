//! `tether certs`.

use std::path::PathBuf;
use std::process::ExitCode;

use tether_migrator::tls::{self, CertOptions};

/// Keep a CA in DIR and issue each host a server and a client certificate.
///
/// Files: DIR/ca.pem is the trust bundle and DIR/ca.key the CA's key (mode 0600; keep it off the
/// hosts). Each NAME gets DIR/NAME/ with ca.pem (a copy of the bundle), server.pem and
/// server.key (TLS server use only: `tether agent --certs DIR/NAME`), and client.pem and
/// client.key (TLS client use only: `tether migrate --certs DIR/NAME`). Both certificates carry
/// NAME as DNS name and common name; it is the name `tether migrate --agent-name` expects and
/// `tether agent` logs. Keys are written mode 0600; tether refuses to load a key file that group
/// or others may read or write.
///
/// Validity: host certificates are valid for --days (default 90) from now (backdated one hour
/// for clock skew), a new CA for --ca-days (default 1826, five years).
///
/// Rotation: running `tether certs --out DIR --name NAME` again reissues NAME's certificates and
/// keys under the existing CA; hosts issued earlier keep working with it. Every run also copies
/// the bundle into every host directory under DIR.
///
/// CA rotation, also the way to revoke a host (there are no revocation lists): 1. `tether certs
/// --out DIR --new-ca` makes a new CA that signs from then on; the bundle trusts the new and the
/// old CA; deploy every host's ca.pem. 2. `tether certs --out DIR --name H ...` for every host
/// but the revoked ones (remove their directories); deploy. 3. `tether certs --out DIR
/// --drop-old-ca` leaves only the new CA in the bundle; deploy every host's ca.pem: certificates
/// of the old CA are refused from then on. `--new-ca --drop-old-ca` together trusts only the
/// new CA at once (hosts not yet reissued are cut off).
#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("what").required(true).multiple(true).args(["names", "new_ca", "drop_old_ca"])
))]
pub struct CertsArgs {
    /// The CA directory (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A host to issue certificates for (repeat for each host); its certificates' DNS name.
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,
    /// Validity of the host certificates issued, in days.
    #[arg(long, value_name = "N", default_value_t = tls::DEFAULT_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
    /// Validity of a new CA, in days (only when one is made).
    #[arg(long, value_name = "N", default_value_t = tls::DEFAULT_CA_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=7305))]
    ca_days: u32,
    /// Start a CA rotation: a new CA signs from now on; the bundle trusts it and the old one.
    #[arg(long)]
    new_ca: bool,
    /// Finish a CA rotation: the bundle trusts only the current CA.
    #[arg(long)]
    drop_old_ca: bool,
}

/// Runs `tether certs`.
pub fn run(a: CertsArgs) -> anyhow::Result<ExitCode> {
    let opts = CertOptions {
        days: a.days,
        ca_days: a.ca_days,
        new_ca: a.new_ca,
        drop_old_ca: a.drop_old_ca,
    };
    let r = tls::issue(&a.out, &a.names, &opts)?;
    for d in &r.issued {
        println!("{}", d.display());
    }
    if r.new_ca {
        eprintln!(
            "tether: new CA in {} (valid {} days)",
            a.out.display(),
            a.ca_days
        );
    }
    if !r.refreshed.is_empty() {
        eprintln!(
            "tether: trust bundle updated in {}",
            r.refreshed
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if r.trusted_cas > 1 {
        eprintln!(
            "tether: the bundle trusts the new and the previous CA: reissue every host, deploy, \
             then run `tether certs --out {} --drop-old-ca`",
            a.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
