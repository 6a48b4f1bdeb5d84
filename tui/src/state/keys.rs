//! What each key does to the state (the terminal's key events are mapped to [`Key`]
//! by the caller, so this is tested without a terminal).

use super::{App, FilterParser, Prompt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Enter,
    Esc,
    Backspace,
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    /// Ctrl-C.
    Interrupt,
}

const PAGE: isize = 20;

pub fn on_key(app: &mut App, key: Key, parse: &FilterParser) {
    if key == Key::Interrupt {
        app.quit = true;
        return;
    }
    if let Some(p) = app.prompt.as_mut() {
        match key {
            Key::Enter => {
                let text = p.text.clone();
                match app.set_filter(&text, parse) {
                    Ok(()) => app.prompt = None,
                    // The previous filter stays; the error shows in place.
                    Err(e) => {
                        if let Some(p) = app.prompt.as_mut() {
                            p.error = Some(e);
                        }
                    }
                }
            }
            Key::Esc => app.prompt = None,
            Key::Backspace => {
                p.text.pop();
                p.error = None;
            }
            Key::Char(c) => {
                p.text.push(c);
                p.error = None;
            }
            _ => {}
        }
        return;
    }
    match key {
        Key::Char('q') => app.quit = true,
        Key::Char('/') => {
            app.prompt = Some(Prompt {
                text: app.filter.text.clone(),
                error: None,
            })
        }
        Key::Char(' ') | Key::Char('p') => app.paused = !app.paused,
        Key::Up | Key::Char('k') => app.scroll(1),
        Key::Down | Key::Char('j') => app.scroll(-1),
        Key::PageUp => app.scroll(PAGE),
        Key::PageDown => app.scroll(-PAGE),
        Key::Home => app.selected = 0,
        Key::Enter => {
            app.detail = app.selected_flow().is_some();
            app.written = None;
        }
        Key::Char('w') if app.detail => {
            app.written = Some(match app.suggestion() {
                None => "nothing to write: policy did not deny this flow".into(),
                Some(yaml) => {
                    let id: String = app.selected_flow().map(|f| f.uuid.chars().filter(|c| c.is_ascii_alphanumeric()).take(8).collect()).unwrap_or_default();
                    let path = format!("flows-allow-{id}.yaml");
                    match std::fs::write(&path, yaml) {
                        Ok(()) => format!("written to {path}: kubectl apply -f {path}"),
                        Err(e) => format!("writing {path}: {e}"),
                    }
                }
            });
        }
        Key::Esc => {
            if app.detail {
                app.detail = false;
            } else {
                app.selected = 0;
            }
        }
        _ => {}
    }
}
