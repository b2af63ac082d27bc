//! `tether certs`.

use std::path::PathBuf;
use std::process::ExitCode;

/// Create a development CA (or reuse the one in DIR) and a certificate for each host.
///
/// Writes DIR/ca.pem and DIR/ca.key (keep it private), and for each NAME a directory DIR/NAME with
/// ca.pem, cert.pem and key.pem: give that directory to the host's `--certs`.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A host name (repeat for each host); it is the certificate's DNS name.
    #[arg(long = "name", value_name = "NAME", required = true)]
    names: Vec<String>,
}

/// Runs `tether certs`.
pub fn run(a: CertsArgs) -> anyhow::Result<ExitCode> {
    let dirs = tether_migrator::tls::generate(&a.out, &a.names)?;
    for d in dirs {
        println!("{}", d.display());
    }
    Ok(ExitCode::SUCCESS)
}
