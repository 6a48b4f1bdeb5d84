//! The panes of aggregates: top denied pairs, the namespace matrix, top talkers, and
//! counters by verdict and drop reason.

use ratatui::{
    Frame,
    layout::{Constraint, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row, Table},
};

use super::{clean, verdict_style};
use crate::state::App;

fn rows_for(area: Rect) -> usize {
    area.height.saturating_sub(3) as usize
}

pub fn denied(frame: &mut Frame, area: Rect, app: &App) {
    let rows: Vec<Row> = app
        .aggregates
        .top_denied(rows_for(area))
        .into_iter()
        .map(|(p, n)| {
            Row::new(vec![
                Cell::from(clean(&format!("{} → {}:{}", p.src, p.dst, p.port))),
                Cell::from(Span::styled(n.to_string(), Style::default().fg(Color::Red))),
            ])
        })
        .collect();
    let t = Table::new(rows, [Constraint::Min(10), Constraint::Length(8)])
        .header(Row::new(vec!["DENIED: SOURCE → DESTINATION:PORT", "COUNT"]).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(Block::default().borders(Borders::ALL).title(" top denied pairs "));
    frame.render_widget(t, area);
}

pub fn matrix(frame: &mut Frame, area: Rect, app: &App) {
    // Columns of 12 characters after a 12-character row label.
    let fit = (area.width.saturating_sub(14) / 12).clamp(1, 8) as usize;
    let (names, cells) = app.aggregates.matrix(fit.min(rows_for(area).max(1)));
    let mut header = vec![Cell::from("from \\ to")];
    header.extend(names.iter().map(|n| Cell::from(clean(n))));
    let rows: Vec<Row> = names
        .iter()
        .map(|s| {
            let mut r = vec![Cell::from(clean(s))];
            for d in &names {
                let (a, x) = cells.get(&(s.clone(), d.clone())).copied().unwrap_or((0, 0));
                let style = if x > 0 { Style::default().fg(Color::Red) } else { Style::default() };
                r.push(Cell::from(Span::styled(if a + x == 0 { "·".to_string() } else { format!("{a}/{x}") }, style)));
            }
            Row::new(r)
        })
        .collect();
    let mut widths = vec![Constraint::Length(12)];
    widths.extend(names.iter().map(|_| Constraint::Length(12)));
    let t = Table::new(rows, widths)
        .header(Row::new(header).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(Block::default().borders(Borders::ALL).title(" namespaces: allowed/denied "));
    frame.render_widget(t, area);
}

pub fn talkers(frame: &mut Frame, area: Rect, app: &App) {
    let rows: Vec<Row> = app
        .aggregates
        .top_talkers(rows_for(area))
        .into_iter()
        .map(|(w, n)| Row::new(vec![Cell::from(clean(&w)), Cell::from(n.to_string())]))
        .collect();
    let t = Table::new(rows, [Constraint::Min(10), Constraint::Length(8)])
        .header(Row::new(vec!["SOURCE", "ATTEMPTS"]).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(Block::default().borders(Borders::ALL).title(" top talkers "));
    frame.render_widget(t, area);
}

pub fn counters(frame: &mut Frame, area: Rect, app: &App) {
    let a = &app.aggregates;
    let mut lines: Vec<Line> = a
        .by_verdict
        .iter()
        .map(|(v, n)| Line::from(vec![Span::styled(format!("{v:<10}"), verdict_style(v)), Span::raw(format!(" {n}"))]))
        .collect();
    let mut reasons: Vec<(&String, &u64)> = a.by_reason.iter().collect();
    reasons.sort_by(|x, y| y.1.cmp(x.1).then_with(|| x.0.cmp(y.0)));
    for (r, n) in reasons {
        lines.push(Line::from(format!("  {} {n}", clean(r))));
    }
    let p = Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" verdicts and drop reasons "));
    frame.render_widget(p, area);
}
