// Package modcheck holds a test that installs this repository's published
// modules the way a user does: from a module proxy, made on the fly from the
// working tree, into a consumer module outside the repository, with no
// workspace, no replace directive and no network. It is a module of its own,
// never published, so that what it needs (golang.org/x/mod) stays out of the
// published modules' graphs. RELEASING.md says how the modules are tagged.
package modcheck
