//! The built-in kernel-TCP transport (under construction).
