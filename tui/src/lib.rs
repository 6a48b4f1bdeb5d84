//! `flows tui`: a live dashboard over the Observer API (a relay, a node-probe, or a file
//! replayed). The flow source ([`source`]) feeds the [`state::App`] without ever waiting
//! for the screen; the screen ([`view`]) is redrawn at a fixed rate from the state. The
//! terminal is restored by a guard on every way out: return, error and panic.

pub mod source;
pub mod state;
pub mod view;

use std::{
    io::Stdout,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    crossterm::{
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute,
        terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
    },
};

pub use source::Source;
use state::{App, FilterParser, Key};

#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    #[error("terminal: {source}")]
    Terminal {
        #[source]
        source: std::io::Error,
    },
    #[error("filter {text:?}: {message}")]
    Filter { text: String, message: String },
    #[error("reading {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Options {
    pub source: Source,
    /// The initial filter (flags of `flows observe`).
    pub filter: String,
    pub parse: FilterParser,
    /// Time between frames.
    pub frame: Duration,
    /// Where to write each frame's drawing time in microseconds, one a line, at exit
    /// (for benchmarks of the real process).
    pub frame_log: Option<PathBuf>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Restores the terminal when dropped, whatever the way out.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> Result<(TerminalGuard, Terminal<CrosstermBackend<Stdout>>), TuiError> {
        let io = |source| TuiError::Terminal { source };
        enable_raw_mode().map_err(io)?;
        let guard = TerminalGuard;
        let mut out = std::io::stdout();
        execute!(out, EnterAlternateScreen).map_err(io)?;
        let terminal = Terminal::new(CrosstermBackend::new(out)).map_err(io)?;
        Ok((guard, terminal))
    }

    fn restore() {
        let _ = disable_raw_mode();
        let _ = execute!(std::io::stdout(), LeaveAlternateScreen, ratatui::crossterm::cursor::Show);
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        TerminalGuard::restore();
    }
}

fn key_of(e: &event::KeyEvent) -> Option<Key> {
    if e.kind != KeyEventKind::Press {
        return None;
    }
    Some(match e.code {
        KeyCode::Char('c') if e.modifiers.contains(KeyModifiers::CONTROL) => Key::Interrupt,
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::Home => Key::Home,
        _ => return None,
    })
}

/// Runs the dashboard until the user quits.
pub async fn run(opts: Options) -> Result<(), TuiError> {
    let mut app = App::new(opts.source.describe());
    app.set_filter(&opts.filter, &opts.parse).map_err(|message| TuiError::Filter {
        text: opts.filter.clone(),
        message,
    })?;
    let app = Arc::new(Mutex::new(app));
    let feeder = tokio::spawn(source::feed(opts.source, app.clone()));

    // A panic restores the terminal before the message is printed.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        TerminalGuard::restore();
        previous(info);
    }));
    let parse = opts.parse;
    let frame = opts.frame;
    let frame_log = opts.frame_log;
    let ui = tokio::task::spawn_blocking(move || -> Result<(), TuiError> {
        let (_guard, mut terminal) = TerminalGuard::enter()?;
        let io = |source| TuiError::Terminal { source };
        // Bounded: one entry per frame, at most an hour of them.
        let mut times: Vec<u32> = Vec::new();
        loop {
            {
                let a = app.lock().unwrap_or_else(|p| p.into_inner());
                if a.quit {
                    if let Some(path) = &frame_log {
                        let text: String = times.iter().map(|t| format!("{t}\n")).collect();
                        std::fs::write(path, text).map_err(|source| TuiError::File { path: path.clone(), source })?;
                    }
                    return Ok(());
                }
                let t = std::time::Instant::now();
                terminal.draw(|f| view::draw(f, &a, now_ms())).map_err(io)?;
                if frame_log.is_some() && times.len() < 36_000 {
                    times.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            // Keys until the next frame is due.
            let deadline = std::time::Instant::now() + frame;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() || !event::poll(left).map_err(io)? {
                    break;
                }
                if let Event::Key(k) = event::read().map_err(io)? {
                    if let Some(key) = key_of(&k) {
                        let mut a = app.lock().unwrap_or_else(|p| p.into_inner());
                        state::on_key(&mut a, key, &parse);
                        if a.quit {
                            break;
                        }
                    }
                }
            }
        }
    });
    let out = ui.await.unwrap_or_else(|e| {
        Err(TuiError::Terminal {
            source: std::io::Error::other(e.to_string()),
        })
    });
    feeder.abort();
    let _ = std::panic::take_hook();
    out
}
