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
}

impl State {
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

fn draw(f: &mut Frame, dir: &Path, s: &State) {
    let v = &s.view;
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
    f.render_widget(
        table(
            " connections ".into(),
            &CONN_HEADER,
            &CONN_RIGHT,
            v.conns.iter().map(conn_cells).collect(),
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
    };
    state.refresh(dir);
    let mut terminal = ratatui::try_init().map_err(|e| Error::io("set up the terminal", e))?;
    let res = (|| -> std::io::Result<()> {
        let mut next = Instant::now() + period;
        loop {
            terminal.draw(|f| draw(f, dir, &state))?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                match event::read()? {
                    Event::Key(k) if quits(&k) => return Ok(()),
                    _ => continue, // Resize and other keys: draw again.
                }
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

    #[test]
    fn draws_an_empty_directory() {
        let mut t = ratatui::Terminal::new(TestBackend::new(120, 20)).unwrap();
        let s = State {
            kept: HashMap::new(),
            view: View::default(),
            error: None,
            read_at: SystemTime::UNIX_EPOCH,
        };
        t.draw(|f| draw(f, Path::new("/m"), &s)).unwrap();
        let screen: String = t.backend().buffer().content().iter().map(|c| c.symbol()).collect();
        assert!(screen.contains("tcpxshim top /m  0 file(s)"), "{screen}");
        assert!(screen.contains("thruput"));
    }
}
