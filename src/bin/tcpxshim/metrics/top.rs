//! `tcpxshim top DIR`: the tables of `tcpxshim stats`, live: the files are read about once a
//! second, and each connection's throughput and latency are those between the last two versions
//! of its file. `q` or Ctrl-C quits and restores the terminal.

use super::stats::{conn_cells, legend, rank_cells, CONN_HEADER, CONN_RIGHT, RANK_HEADER, RANK_RIGHT};
use super::summary::{self, FileSummary, View};
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};
use ratatui::Frame;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};
use tcpxshim::{Error, Result};

/// What the screen shows.
struct State {
    kept: HashMap<String, (Option<FileSummary>, FileSummary)>,
    view: View,
    error: Option<String>,
    read_at: SystemTime,
    /// The first connection row shown (the table scrolls when it does not fit).
    scroll: usize,
    /// Connection rows that fit, as last drawn.
    visible: usize,
}

impl State {
    /// Scrolls the connection table.
    fn key(&mut self, code: KeyCode) {
        let page = self.visible.max(1);
        self.scroll = match code {
            KeyCode::Down | KeyCode::Char('j') => self.scroll.saturating_add(1),
            KeyCode::Up | KeyCode::Char('k') => self.scroll.saturating_sub(1),
            KeyCode::PageDown | KeyCode::Char(' ') => self.scroll.saturating_add(page),
            KeyCode::PageUp => self.scroll.saturating_sub(page),
            KeyCode::Home => 0,
            KeyCode::End => usize::MAX,
            _ => self.scroll,
        };
    }

    fn refresh(&mut self, dir: &Path) {
        match super::stats::read(dir) {
            Ok(files) => {
                summary::advance(&mut self.kept, files);
                self.read_at = SystemTime::now();
                self.view = summary::view_kept(&self.kept, self.read_at);
                self.error = None;
            }
            Err(e) => self.error = Some(e.to_string()),
        }
    }
}

/// A table of `cells` under `header`, columns as wide as their widest cell.
fn table<'a>(title: String, header: &[&str], right: &[bool], cells: Vec<Vec<String>>) -> Table<'a> {
    let widths: Vec<u16> = (0..header.len())
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0) as u16
        })
        .collect();
    let align = |c: usize, s: String, w: u16| -> Cell<'a> {
        let w = w as usize;
        Cell::from(if right[c] {
            format!("{s:>w$}")
        } else {
            format!("{s:<w$}")
        })
    };
    let head = Row::new(
        header
            .iter()
            .enumerate()
            .map(|(c, h)| align(c, h.to_string(), widths[c])),
    )
    .style(Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let rows: Vec<Row> = cells
        .into_iter()
        .map(|r| Row::new(r.into_iter().enumerate().map(|(c, s)| align(c, s, widths[c]))))
        .collect();
    Table::new(rows, widths.iter().map(|&w| Constraint::Length(w)))
        .header(head)
        .column_spacing(2)
        .block(Block::bordered().title(title))
}

fn draw(f: &mut Frame, dir: &Path, s: &mut State) {
    let v = &s.view.clone();
    let rank_height = (v.ranks.len() as u16 + 3).min(f.area().height / 2);
    let [top, conns, ranks] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(4),
        Constraint::Length(rank_height.max(3)),
    ])
    .areas(f.area());
    let when = s
        .read_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (h, m, sec) = ((when / 3600) % 24, (when / 60) % 60, when % 60);
    let status = match &s.error {
        Some(e) => format!("error: {e}"),
        None => legend(v, None),
    };
    let lines = vec![
        Line::from(format!(
            "tcpxshim top {}  {} file(s), {} rank(s), {} connection(s)  read {h:02}:{m:02}:{sec:02} UTC  q: quit",
            dir.display(),
            v.files,
            v.ranks.len(),
            v.conns.len()
        )),
        Line::from(status),
    ];
    f.render_widget(Paragraph::new(lines), top);
    // Borders and header take 3 lines.
    let fit = (conns.height as usize).saturating_sub(3).max(1);
    let n = v.conns.len();
    s.visible = fit;
    s.scroll = s.scroll.min(n.saturating_sub(fit));
    let title = if n > fit {
        format!(
            " connections {}-{} of {n} (Up/Down, PgUp/PgDn: scroll) ",
            s.scroll + 1,
            (s.scroll + fit).min(n)
        )
    } else {
        " connections ".into()
    };
    f.render_widget(
        table(
            title,
            &CONN_HEADER,
            &CONN_RIGHT,
            v.conns.iter().skip(s.scroll).take(fit).map(conn_cells).collect(),
        ),
        conns,
    );
    let mut rank_rows: Vec<Vec<String>> = v.ranks.iter().map(rank_cells).collect();
    let stale: Vec<String> = v
        .ranks
        .iter()
        .filter(|r| r.age > 30.0)
        .map(|r| format!("rank {} written {:.0}s ago", r.key.rank, r.age))
        .collect();
    let title = if stale.is_empty() {
        " per rank ".to_string()
    } else {
        format!(" per rank (stopped?: {}) ", stale.join(", "))
    };
    rank_rows.truncate(ranks.height.saturating_sub(3) as usize);
    f.render_widget(table(title, &RANK_HEADER, &RANK_RIGHT, rank_rows), ranks);
}

/// True for the keys that quit: `q`, `Q`, Esc and Ctrl-C.
fn quits(key: &event::KeyEvent) -> bool {
    key.kind != KeyEventKind::Release
        && (matches!(key.code, KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc)
            || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL)))
}

/// Runs the view until a quitting key; the terminal is restored on every way out (panics too:
/// ratatui's hook restores it first).
pub fn run(dir: &Path, period: Duration) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::invalid_argument(format!("{} is not a directory", dir.display())));
    }
    let mut state = State {
        kept: HashMap::new(),
        view: View::default(),
        error: None,
        read_at: SystemTime::now(),
        scroll: 0,
        visible: 1,
    };
    state.refresh(dir);
    let mut terminal = ratatui::try_init().map_err(|e| Error::io("set up the terminal", e))?;
    let res = (|| -> std::io::Result<()> {
        let mut next = Instant::now() + period;
        loop {
            terminal.draw(|f| draw(f, dir, &mut state))?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                match event::read()? {
                    Event::Key(k) if quits(&k) => return Ok(()),
                    Event::Key(k) if k.kind != KeyEventKind::Release => state.key(k.code),
                    _ => {} // Resize and the rest: draw again.
                }
                continue;
            }
            state.refresh(dir);
            next = Instant::now() + period;
        }
    })();
    ratatui::restore();
    res.map_err(|e| Error::io("terminal", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossterm::event::KeyEvent;
    use ratatui::backend::TestBackend;

    #[test]
    fn quitting_keys() {
        assert!(quits(&KeyEvent::new(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(&KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(&KeyEvent::new(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(&KeyEvent::new(KeyCode::Down, KeyModifiers::NONE)));
    }

    fn screen(t: &ratatui::Terminal<TestBackend>) -> String {
        let b = t.backend().buffer();
        (0..b.area.height)
            .map(|y| (0..b.area.width).map(|x| b[(x, y)].symbol()).collect::<String>() + "\n")
            .collect()
    }

    #[test]
    fn scrolls_connections_that_do_not_fit() {
        let conns = (0..30)
            .map(|peer| summary::ConnRow {
                key: summary::ConnKey {
                    rank_num: 0,
                    rank: "0".into(),
                    host: "h".into(),
                    local_rank: "0".into(),
                    comm: "0x1".into(),
                    dir: "send".into(),
                    peer_num: peer,
                    peer: format!("p{peer}"),
                    dev: "0".into(),
                    transport: "tcpx".into(),
                },
                now: summary::Conn::default(),
                rate: None,
                p50: None,
                p99: None,
                basis: summary::Basis::Interval,
            })
            .collect();
        let mut s = State {
            kept: HashMap::new(),
            view: View {
                conns,
                ranks: Vec::new(),
                files: 1,
            },
            error: None,
            read_at: SystemTime::UNIX_EPOCH,
            scroll: 0,
            visible: 1,
        };
        let mut t = ratatui::Terminal::new(TestBackend::new(120, 20)).unwrap();
        t.draw(|f| draw(f, Path::new("/m"), &mut s)).unwrap();
        let first = screen(&t);
        assert!(first.contains(" p0 ") && !first.contains(" p29 "), "{first}");
        assert!(first.contains("connections 1-"), "{first}");
        s.key(KeyCode::End);
        t.draw(|f| draw(f, Path::new("/m"), &mut s)).unwrap();
        let last = screen(&t);
        assert!(last.contains(" p29 ") && !last.contains(" p0 "), "{last}");
        assert!(last.contains("of 30"), "{last}");
        s.key(KeyCode::Up);
        s.key(KeyCode::Home);
        t.draw(|f| draw(f, Path::new("/m"), &mut s)).unwrap();
        assert!(screen(&t).contains(" p0 "));
    }

    #[test]
    fn draws_an_empty_directory() {
        let mut t = ratatui::Terminal::new(TestBackend::new(120, 20)).unwrap();
        let mut s = State {
            kept: HashMap::new(),
            view: View::default(),
            error: None,
            read_at: SystemTime::UNIX_EPOCH,
            scroll: 0,
            visible: 1,
        };
        t.draw(|f| draw(f, Path::new("/m"), &mut s)).unwrap();
        let screen: String = t.backend().buffer().content().iter().map(|c| c.symbol()).collect();
        assert!(screen.contains("tcpxshim top /m  0 file(s)"), "{screen}");
        assert!(screen.contains("thruput"));
    }
}
