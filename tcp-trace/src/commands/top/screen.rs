//! `top`'s full-screen view: the state (rows, sort, keys) kept apart from
//! drawing it, so the keys are tested without a terminal.

use anyhow::{Context as _, Result};
use clap::ValueEnum as _;
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Cell, Paragraph, Row as TableRow, Table},
    DefaultTerminal, Frame,
};

use super::{cells, header, table::Row, SortBy};
use crate::aggregate::GroupBy;

/// The keys, as the screen shows them.
pub const KEYS: &str = "←/→ sort column   r reverse   q quit";

/// What the screen shows, and how the keys change it.
pub struct View {
    pub sort: SortBy,
    pub reversed: bool,
    pub by: GroupBy,
    rows: Vec<Row>,
    seconds: f64,
    title: String,
}

impl View {
    pub fn new(sort: SortBy, by: GroupBy) -> View {
        View {
            sort,
            reversed: false,
            by,
            rows: Vec::new(),
            seconds: 1.0,
            title: String::new(),
        }
    }

    /// New figures (sorted here, as the view says).
    pub fn update(&mut self, rows: Vec<Row>, seconds: f64, title: String) {
        self.rows = rows;
        self.seconds = seconds;
        self.title = title;
        self.resort();
    }

    fn resort(&mut self) {
        self.sort.sort(&mut self.rows);
        if self.reversed {
            self.rows.reverse();
        }
    }

    /// Applies a key; returns whether it asks to quit.
    pub fn key(&mut self, code: KeyCode, modifiers: KeyModifiers) -> bool {
        let all = SortBy::value_variants();
        let at = all.iter().position(|s| *s == self.sort).unwrap_or(0);
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return true,
            // Raw mode turns Ctrl-C into a key.
            KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => return true,
            KeyCode::Right | KeyCode::Char('>') => self.sort = all[(at + 1) % all.len()],
            KeyCode::Left | KeyCode::Char('<') => self.sort = all[(at + all.len() - 1) % all.len()],
            KeyCode::Char('r') => self.reversed = !self.reversed,
            _ => return false,
        }
        self.resort();
        false
    }

    /// The column the rows are sorted by, if it is one shown (SOCKETS,
    /// the default, is the sum of the state columns).
    fn sorted_column(&self) -> Option<usize> {
        match self.sort {
            SortBy::Sockets => None,
            sort => SortBy::value_variants()
                .iter()
                .filter(|s| **s != SortBy::Sockets)
                .position(|s| *s == sort),
        }
    }

    pub fn draw(&self, frame: &mut Frame) {
        let [title, table, keys] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(1),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        let sorted = self.sorted_column();
        let bold = Style::default().add_modifier(Modifier::BOLD);
        let headings = header(self.by);
        let widths: Vec<Constraint> = headings
            .iter()
            .enumerate()
            .map(|(i, h)| match i {
                0 => Constraint::Min(20),
                _ => Constraint::Length(h.len().max(7) as u16),
            })
            .collect();
        let head = TableRow::new(headings.into_iter().enumerate().map(|(i, h)| {
            let style = if Some(i) == sorted {
                bold.add_modifier(Modifier::REVERSED)
            } else {
                bold
            };
            Cell::from(h).style(style)
        }));
        let rows = self
            .rows
            .iter()
            .map(|r| TableRow::new(cells(r, self.seconds)));
        frame.render_widget(Paragraph::new(self.title.as_str()), title);
        frame.render_widget(Table::new(rows, widths).header(head), table);
        let direction = if self.reversed { "smallest" } else { "largest" };
        let status = format!(
            "{KEYS}   sorted by {} ({direction} first)",
            self.sort.to_possible_value().expect("named").get_name()
        );
        frame.render_widget(Line::from(status).style(bold), keys);
    }
}

/// The terminal in full-screen mode: restored when dropped, and by
/// ratatui's panic hook on a panic.
pub struct Screen {
    terminal: DefaultTerminal,
}

impl Screen {
    pub fn open() -> Result<Screen> {
        let terminal = ratatui::try_init().context("setting up the terminal")?;
        Ok(Screen { terminal })
    }

    pub fn draw(&mut self, view: &View) -> Result<()> {
        self.terminal
            .draw(|frame| view.draw(frame))
            .context("drawing")?;
        Ok(())
    }

    /// Applies the keys pressed since the last call; whether to quit.
    pub fn keys(&mut self, view: &mut View) -> Result<(bool, bool)> {
        let mut changed = false;
        while event::poll(std::time::Duration::ZERO).context("reading keys")? {
            if let Event::Key(key) = event::read().context("reading keys")? {
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                if view.key(key.code, key.modifiers) {
                    return Ok((true, changed));
                }
                changed = true;
            }
        }
        Ok((false, changed))
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::{backend::TestBackend, Terminal};

    fn row(name: &str, established: u64) -> Row {
        let mut r = Row {
            name: name.into(),
            ..Default::default()
        };
        r.states[0] = established;
        r
    }

    #[test]
    fn keys_move_the_sort_reverse_it_and_quit() {
        let mut view = View::new(SortBy::Sockets, GroupBy::Process);
        view.update(vec![row("1 a", 1), row("2 b", 5)], 1.0, "t".into());
        let none = KeyModifiers::NONE;
        assert!(!view.key(KeyCode::Right, none));
        assert_eq!(view.sort, SortBy::Established);
        assert_eq!(view.rows[0].name, "2 b");
        assert!(!view.key(KeyCode::Char('r'), none));
        assert_eq!(view.rows[0].name, "1 a", "reversed");
        assert!(!view.key(KeyCode::Left, none));
        assert!(!view.key(KeyCode::Left, none));
        assert_eq!(view.sort, SortBy::Name, "wraps around");
        assert!(!view.key(KeyCode::Char('x'), none));
        assert!(view.key(KeyCode::Char('q'), none));
        assert!(view.key(KeyCode::Char('c'), KeyModifiers::CONTROL));
    }

    #[test]
    fn the_screen_shows_rows_keys_and_the_sorted_column() {
        let mut view = View::new(SortBy::Established, GroupBy::Process);
        view.update(vec![row("42 app", 3)], 1.0, "12:00:00  1 rows".into());
        let mut terminal = Terminal::new(TestBackend::new(160, 6)).unwrap();
        terminal.draw(|f| view.draw(f)).unwrap();
        let screen: Vec<String> = (0..6)
            .map(|y| {
                (0..160)
                    .map(|x| terminal.backend().buffer()[(x, y)].symbol().to_string())
                    .collect()
            })
            .collect();
        assert!(screen[0].starts_with("12:00:00  1 rows"), "{screen:#?}");
        assert!(screen[1].starts_with("PID COMM") && screen[1].contains("OLDEST_CW"));
        assert!(screen[2].starts_with("42 app"), "{screen:#?}");
        assert!(screen[5].contains("q quit") && screen[5].contains("sorted by established"));
        let estab = screen[1].find("ESTAB").unwrap() as u16;
        let cell = &terminal.backend().buffer()[(estab, 1)];
        assert!(
            cell.modifier.contains(Modifier::REVERSED),
            "the sorted column stands out"
        );
    }
}
