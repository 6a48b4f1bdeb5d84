//! Drawing the [`App`] state: a header, the live flow table, panes of aggregates, a help
//! bar or the filter prompt, and the detail of a selected flow. Pure function of the
//! state and the frame size, so it is tested with ratatui's TestBackend.

mod detail;
mod panes;

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row, Table},
};

use crate::state::{
    App, Connection,
    aggregate::{port_name, side_name, verdict_name},
};

/// Below this width the panes of aggregates give way to the table (only top denied
/// pairs stay, under it).
pub const WIDE: u16 = 120;

/// Flow data as it may reach the terminal: control characters, bidirectional overrides
/// and invisible characters shown as escapes (`flows_flow::text::printable`).
pub fn clean(s: &str) -> String {
    flows_flow::text::printable(s).into_owned()
}

pub fn verdict_style(v: &str) -> Style {
    match v {
        "FORWARDED" => Style::default().fg(Color::Green),
        "DROPPED" => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        "AUDIT" => Style::default().fg(Color::Yellow),
        _ => Style::default().fg(Color::Magenta),
    }
}

/// HH:MM:SS.mmm (UTC) of a flow.
pub fn clock(t: Option<&flows_proto::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let s = t.seconds.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}.{:03}", s / 3600, s % 3600 / 60, s % 60, t.nanos.max(0) / 1_000_000)
}

pub fn draw(frame: &mut Frame, app: &App, now_ms: u64) {
    let area = frame.area();
    let [header, body, footer] = Layout::vertical([Constraint::Length(2), Constraint::Min(3), Constraint::Length(1)]).areas(area);
    draw_header(frame, header, app, now_ms);
    if area.width >= WIDE {
        let [left, right] = Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(body);
        draw_table(frame, left, app);
        let [denied, matrix, talkers, counters] = Layout::vertical([
            Constraint::Ratio(1, 4),
            Constraint::Ratio(1, 4),
            Constraint::Ratio(1, 4),
            Constraint::Ratio(1, 4),
        ])
        .areas(right);
        panes::denied(frame, denied, app);
        panes::matrix(frame, matrix, app);
        panes::talkers(frame, talkers, app);
        panes::counters(frame, counters, app);
    } else {
        let [table, denied] = Layout::vertical([Constraint::Min(3), Constraint::Length(7)]).areas(body);
        draw_table(frame, table, app);
        panes::denied(frame, denied, app);
    }
    draw_footer(frame, footer, app);
    if app.detail {
        detail::draw(frame, area, app);
    }
}

fn draw_header(frame: &mut Frame, area: Rect, app: &App, now_ms: u64) {
    let conn = match &app.connection {
        Connection::Connecting => Span::styled("connecting", Style::default().fg(Color::Yellow)),
        Connection::Connected => Span::styled("connected", Style::default().fg(Color::Green)),
        Connection::Disconnected { error, retry_in_ms } => Span::styled(
            format!("disconnected: {} (retry in {:.1} s)", clean(error), *retry_in_ms as f64 / 1000.0),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        Connection::Ended => Span::styled("replay ended", Style::default().fg(Color::Yellow)),
    };
    let nodes = if app.nodes_unavailable.is_empty() {
        Span::raw(format!("nodes {} up", app.connected_nodes()))
    } else {
        Span::styled(
            format!("nodes {} up, {} down ({})", app.connected_nodes(), app.nodes_unavailable.len(), app.nodes_unavailable.join(",")),
            Style::default().fg(Color::Red),
        )
    };
    let lost_style = if app.lost > 0 { Style::default().fg(Color::Red).add_modifier(Modifier::BOLD) } else { Style::default() };
    let first = Line::from(vec![
        Span::styled("flows ", Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(clean(&app.server)),
        Span::raw("  "),
        conn,
        Span::raw("  "),
        nodes,
    ]);
    let mut second = vec![
        Span::raw(format!("{:.0} flows/s", app.aggregates.rate.per_second(now_ms))),
        Span::raw(format!("  dropped {:.1}%", app.dropped_share() * 100.0)),
        Span::raw("  "),
        Span::styled(format!("lost {}", app.lost), lost_style),
    ];
    if app.paused {
        second.push(Span::styled("  PAUSED", Style::default().fg(Color::Yellow).add_modifier(Modifier::BOLD)));
    }
    if !app.filter.text.is_empty() {
        second.push(Span::raw(format!("  filter: {}", clean(&app.filter.text))));
    }
    frame.render_widget(Paragraph::new(vec![first, Line::from(second)]), area);
}

fn draw_table(frame: &mut Frame, area: Rect, app: &App) {
    let block = Block::default().borders(Borders::ALL).title(format!(" flows ({} held) ", app.recent.len()));
    let inner_rows = area.height.saturating_sub(3) as usize; // borders and the header row
    let start = if inner_rows == 0 || app.selected < inner_rows { 0 } else { app.selected + 1 - inner_rows };
    let rows: Vec<Row> = app
        .recent
        .iter()
        .rev()
        .skip(start)
        .take(inner_rows)
        .enumerate()
        .map(|(i, f)| {
            let ip = f.ip.clone().unwrap_or_default();
            let v = verdict_name(f.verdict);
            let row = Row::new(vec![
                Cell::from(clock(f.time.as_ref())),
                Cell::from(clean(&side_name(f.source.as_ref(), &ip.source))),
                Cell::from(clean(&side_name(f.destination.as_ref(), &ip.destination))),
                Cell::from(port_name(f)),
                Cell::from(Span::styled(v, verdict_style(v))),
                Cell::from(clean(&f.drop_reason)),
            ]);
            if start + i == app.selected && (app.selected > 0 || app.detail || app.paused) {
                row.style(Style::default().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        })
        .collect();
    let widths = [
        Constraint::Length(12),
        Constraint::Fill(1),
        Constraint::Fill(1),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(14),
    ];
    let table = Table::new(rows, widths)
        .header(Row::new(vec!["TIME", "SOURCE", "DESTINATION", "PORT", "VERDICT", "REASON"]).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(block);
    frame.render_widget(table, area);
}

fn draw_footer(frame: &mut Frame, area: Rect, app: &App) {
    let line = match &app.prompt {
        Some(p) => {
            let mut spans = vec![Span::styled("filter> ", Style::default().add_modifier(Modifier::BOLD)), Span::raw(clean(&p.text))];
            if let Some(e) = &p.error {
                spans.push(Span::styled(format!("  {}", clean(e)), Style::default().fg(Color::Red)));
            }
            Line::from(spans)
        }
        None => Line::from(Span::styled(
            "q quit  / filter  space pause  ↑↓ PgUp PgDn scroll  enter details  w write its suggested policy  esc back",
            Style::default().fg(Color::DarkGray),
        )),
    };
    frame.render_widget(Paragraph::new(line), area);
}
