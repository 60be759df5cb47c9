//! loom models of every cross-thread hand-off. The first hand-off (the I/O
//! rings) arrives with the server issue (#3); until then there is nothing
//! shared between threads to model.

#![forbid(unsafe_code)]
