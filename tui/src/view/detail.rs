//! The selected flow in full: both ends (namespace, pod, labels, workloads, node), the
//! policies that allowed or denied it, the drop reason.

use ratatui::{
    Frame,
    layout::Rect,
    style::{Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Clear, Paragraph, Wrap},
};

use super::{clean, clock, verdict_style};
use crate::state::{
    App,
    aggregate::{port_name, verdict_name},
};

fn endpoint(title: &str, e: Option<&flows_proto::Endpoint>, ip: &str, out: &mut Vec<Line<'static>>) {
    out.push(Line::from(Span::styled(format!("{title} {}", clean(ip)), Style::default().add_modifier(Modifier::BOLD))));
    let Some(e) = e else {
        out.push(Line::from("  (not annotated)"));
        return;
    };
    if e.is_world {
        out.push(Line::from("  world (outside the cluster)"));
        return;
    }
    let field = |k: &str, v: String| Line::from(format!("  {k:<10} {}", clean(&v)));
    out.push(field("namespace", e.namespace.clone()));
    out.push(field("pod", e.pod_name.clone()));
    out.push(field("labels", e.labels.join(", ")));
    out.push(field("workloads", e.workloads.iter().map(|w| format!("{}/{}", w.kind, w.name)).collect::<Vec<_>>().join(" ← ")));
    out.push(field("node", e.node_name.clone()));
}

fn policies(title: &str, p: &[flows_proto::Policy], out: &mut Vec<Line<'static>>) {
    if !p.is_empty() {
        let names: Vec<String> = p.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect();
        out.push(Line::from(format!("  {title:<18} {}", clean(&names.join(", ")))));
    }
}

pub fn draw(frame: &mut Frame, area: Rect, app: &App) {
    let Some(f) = app.selected_flow() else { return };
    let w = area.width.saturating_sub(4).min(100);
    let h = area.height.saturating_sub(2).min(60);
    let r = Rect::new(area.x + (area.width - w) / 2, area.y + (area.height - h) / 2, w, h);
    let ip = f.ip.clone().unwrap_or_default();
    let v = verdict_name(f.verdict);
    let mut lines = vec![Line::from(vec![
        Span::raw(format!("{}  {}  ", clock(f.time.as_ref()), port_name(f))),
        Span::styled(v, verdict_style(v)),
        Span::raw(if f.drop_reason.is_empty() { String::new() } else { format!(" ({})", clean(&f.drop_reason)) }),
        Span::raw(format!("  node {}", clean(&f.node_name))),
    ])];
    // Shown first: the rest may not fit.
    if let Some(w) = &app.written {
        lines.push(Line::from(Span::styled(clean(w), Style::default().add_modifier(Modifier::BOLD))));
    }
    endpoint("source", f.source.as_ref(), &ip.source, &mut lines);
    endpoint("destination", f.destination.as_ref(), &ip.destination, &mut lines);
    lines.push(Line::from(Span::styled("policies", Style::default().add_modifier(Modifier::BOLD))));
    let before = lines.len();
    policies("egress allowed by", &f.egress_allowed_by, &mut lines);
    policies("ingress allowed by", &f.ingress_allowed_by, &mut lines);
    policies("egress denied by", &f.egress_denied_by, &mut lines);
    policies("ingress denied by", &f.ingress_denied_by, &mut lines);
    if lines.len() == before {
        lines.push(Line::from("  none decided (no policy selects either end)"));
    }
    if let Some(yaml) = app.suggestion() {
        lines.push(Line::from(Span::styled(
            "to allow it, flows policy suggest would add (w: write it to a file):",
            Style::default().add_modifier(Modifier::BOLD),
        )));
        lines.extend(yaml.lines().map(|l| Line::from(format!("  {}", clean(l)))));
    }

    let p = Paragraph::new(lines)
        .wrap(Wrap { trim: false })
        .block(Block::default().borders(Borders::ALL).title(" flow (esc: back) "));
    frame.render_widget(Clear, r);
    frame.render_widget(p, r);
}
