//! The `vqclip` command line: parses arguments, calls the library, prints results.

mod cli;

use clap::Parser;

fn main() {
    // A reader that stops early (`vqclip ... | head`) ends the process quietly, as it does
    // other Unix tools, instead of a panic in println! on the broken pipe.
    #[cfg(unix)]
    // SAFETY: called first, before any other thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // First, while this is the only thread: it may set an environment variable.
    vqclip::gpu::prepare_driver_environment();
    let args = cli::Cli::parse();
    let result = cli::run(args);
    if vqclip::gpu::profile::enabled() {
        let rows = vqclip::gpu::profile::report();
        if !rows.is_empty() {
            eprintln!(
                "GPU time by kernel (VQCLIP_PROFILE: each dispatch submitted alone and waited for)\n{}",
                vqclip::gpu::profile::format_table(&rows, 25)
            );
        }
    }
    if let Err(e) = result {
        // The cause chain, skipping causes that a message above already quotes (library
        // errors carry their I/O cause in their own text).
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg.push_str(": ");
                msg.push_str(&c);
            }
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
