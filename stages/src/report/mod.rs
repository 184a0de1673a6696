//! Things a person looks at: preview grids (plots and tables come with training).

pub mod preview;
