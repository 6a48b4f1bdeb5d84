//! `flows tui`: the live dashboard (flows-tui) over a relay, a node-probe or a file.

use std::{path::PathBuf, time::Duration};

use flows_proto::GetFlowsRequest;

#[derive(clap::Args, Debug)]
pub struct TuiArgs {
    /// Relay or node-probe (host:port). Default: the running lab's relay.
    #[arg(long, env = "FLOWS_SERVER")]
    pub server: Option<String>,
    /// Replay JSON lines (`flows observe -o json`) instead of a server.
    #[arg(long, conflicts_with = "server")]
    pub input_file: Option<PathBuf>,
    /// Replay rate in flows a second (0: as fast as read).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Recent flows to load before following.
    #[arg(long, default_value_t = 1000)]
    pub last: u64,
    /// Initial filter: the filter flags of `flows observe`, as one argument
    /// (`--filter "--verdict drop -n db"`); `/` changes it while running.
    #[arg(long, default_value = "")]
    pub filter: String,
    /// Milliseconds between frames.
    #[arg(long, default_value_t = 100)]
    pub frame_ms: u64,
    /// Write each frame's drawing time (µs, one a line) to this file at exit.
    #[arg(long, hide = true)]
    pub frame_log: Option<PathBuf>,
    #[arg(long, env = "FLOWS_LAB_DIR")]
    pub lab_state: Option<PathBuf>,
}

pub async fn run(args: TuiArgs) -> anyhow::Result<()> {
    let source = match (&args.input_file, &args.server) {
        (Some(path), _) => flows_tui::Source::File { path: path.clone(), rate: args.rate },
        (None, server) => {
            let dir = args.lab_state.clone().unwrap_or_else(flows_lab::state::default_dir);
            let (addr, dialer) = crate::connect::relay_or_flag(
                server.as_ref(),
                &dir,
                "no server: give --server host:port or --input-file, or start the lab with --probes",
            )?;
            flows_tui::Source::Server {
                addr,
                dialer,
                request: GetFlowsRequest { number: args.last, follow: true, ..Default::default() },
            }
        }
    };
    flows_tui::run(flows_tui::Options {
        source,
        filter: args.filter,
        parse: Box::new(crate::filters::parse_text),
        frame: Duration::from_millis(args.frame_ms.max(10)),
        frame_log: args.frame_log,
    })
    .await?;
    Ok(())
}
