package modcheck

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/mod/modfile"
	"golang.org/x/mod/module"
	"golang.org/x/mod/zip"
)

// rootPath is the root module's path; every module here starts with it.
const rootPath = "github.com/seed0ad592b7/advisory"

// published are the directories of the modules users get, relative to the
// repository: the library (with pglock), its adapters, and the Docker
// helper that pglock's demo runs with go run when a Docker engine answers.
// A directory missing here is skipped (the goose adapter, for one, may not
// exist on every branch).
var published = []string{".", "otel", "goose", "internal/pgdocker"}

// unpublished are the modules only this repository uses (migrate is the
// golang-migrate recipe, tested there; it has no API).
var unpublished = []string{"bench", "migrate", "internal/modcheck"}

// forbidden are substrings of module paths that must not be in the module
// graph of a consumer of the library or of an adapter: the Docker client
// the tests use (dockertest and its ~30 modules). (goleak, which the tests
// also use, is there: one module, no requirement of its own in the graph.)
var forbidden = []string{"docker", "moby", "opencontainers", "containerd", "sirupsen"}

// consumers are the programs built against the published modules, one
// consumer module each.
var consumers = []struct {
	dir, module, main string
}{
	{".", rootPath, `package main

import (
	"fmt"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/compat"
)

func main() {
	_ = advisory.Acquire
	fmt.Println(advisory.StringKey("consumer"), compat.Goose())
}
`},
	{"otel", rootPath + "/otel", `package main

import (
	"fmt"

	"github.com/seed0ad592b7/advisory"
	advisoryotel "github.com/seed0ad592b7/advisory/otel"
	"go.opentelemetry.io/otel/metric/noop"
)

func main() {
	tr, err := advisoryotel.NewTracer(noop.NewMeterProvider())
	fmt.Println(tr != nil, err, advisory.Int64Key(1))
}
`},
	{"goose", rootPath + "/goose", `package main

import (
	"fmt"

	"github.com/seed0ad592b7/advisory/compat"
	advisorygoose "github.com/seed0ad592b7/advisory/goose"
)

func main() { fmt.Printf("%T\n", advisorygoose.NewSessionLocker(compat.Goose())) }
`},
}

// TestConsumers publishes the modules to a file proxy at the version the
// modules require of each other, then, as a user outside the repository
// (GOWORK=off, GOFLAGS=-mod=mod, GOPROXY ending in off), gets each module
// into a fresh consumer module, builds a program with it and checks the
// consumer's module graph and what it downloaded; then installs pglock
// with go install ...@latest and runs its demo.
func TestConsumers(t *testing.T) {
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	mods := readModules(t, repo)
	version := checkRequirements(t, mods)
	proxy := t.TempDir()
	for dir, mf := range mods {
		publish(t, proxy, filepath.Join(repo, dir), mf.Module.Mod.Path, version)
	}
	g := newGoEnv(t, proxy)
	t.Logf("published %d modules at %s to %s", len(mods), version, proxy)

	for _, c := range consumers {
		if _, ok := mods[c.dir]; !ok {
			t.Logf("no module %s on this branch", c.module)
			continue
		}
		t.Run(path.Base(c.module), func(t *testing.T) {
			dir := t.TempDir()
			write(t, filepath.Join(dir, "go.mod"), "module example.com/consumer\n\ngo 1.25.0\n")
			write(t, filepath.Join(dir, "main.go"), c.main)
			g.run(t, dir, "go", "get", c.module+"@"+version)
			g.run(t, dir, "go", "build", "-o", os.DevNull, ".")
			// Tidy loads the tests of the packages the consumer uses:
			// whatever they import must come from the modules' own go.mod
			// (or tidy looks it up and adds it to the consumer's). -e: the
			// tests of third-party packages may need modules this
			// machine's cache lacks.
			g.run(t, dir, "go", "mod", "tidy", "-e")
			graph := graphModules(g.run(t, dir, "go", "mod", "graph"))
			t.Logf("module graph of a consumer of %s: %d modules: %s", c.module, len(graph), strings.Join(graph, " "))
			for _, m := range graph {
				if bad := isForbidden(m); bad != "" {
					t.Errorf("a consumer of %s has %s in its module graph (%q): a test-only module reached %s's go.mod", c.module, m, bad, c.module)
				}
			}
		})
	}
	// What the consumers fetched, .mod files included: the module cache is
	// theirs alone.
	fetched := downloaded(t, filepath.Join(g.modcache, "cache", "download"))
	t.Logf("the consumers downloaded: %s", strings.Join(fetched, " "))
	for _, m := range fetched {
		if bad := isForbidden(m); bad != "" {
			t.Errorf("a consumer downloaded %s (%q)", m, bad)
		}
	}

	t.Run("pglock", func(t *testing.T) {
		dir := t.TempDir()
		g.run(t, dir, "go", "install", rootPath+"/cmd/pglock@latest")
		bin := filepath.Join(g.bin, "pglock")
		out := g.run(t, dir, bin, "version")
		if !strings.Contains(out, version) {
			t.Errorf("pglock version = %q, want it to name %s", out, version)
		}
		// The demo starts its own server (Docker, else local binaries).
		out = g.run(t, dir, bin, "demo")
		if !strings.Contains(out, "all checks passed") {
			t.Errorf("pglock demo said:\n%s\nwant \"all checks passed\"", out)
		}
	})
}

// readModules reads the go.mod of every published module present, and
// fails the test on a go.mod in the repository that is in neither list.
func readModules(t *testing.T, repo string) map[string]*modfile.File {
	t.Helper()
	known := map[string]bool{}
	for _, d := range append(append([]string{}, published...), unpublished...) {
		known[d] = true
	}
	err := filepath.WalkDir(repo, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.Name() != "go.mod" {
			return nil
		}
		rel, _ := filepath.Rel(repo, filepath.Dir(path))
		if !known[filepath.ToSlash(rel)] {
			t.Errorf("%s: a module neither published nor unpublished: add it to one of the lists in %s", path, "consumer_test.go")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	mods := map[string]*modfile.File{}
	for _, dir := range published {
		name := filepath.Join(repo, dir, "go.mod")
		data, err := os.ReadFile(name)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		mf, err := modfile.Parse(name, data, nil)
		if err != nil {
			t.Fatal(err)
		}
		if want := strings.TrimSuffix(rootPath+"/"+dir, "/."); mf.Module.Mod.Path != want {
			t.Fatalf("%s: module %s, want %s", name, mf.Module.Mod.Path, want)
		}
		mods[dir] = mf
	}
	return mods
}

// checkRequirements checks what a consumer relies on in each published
// go.mod: no replace directive (ignored outside the repository), the go
// version the README promises, and one real version for every requirement
// on a module of this repository; it returns that version.
func checkRequirements(t *testing.T, mods map[string]*modfile.File) string {
	t.Helper()
	version := ""
	for dir, mf := range mods {
		if len(mf.Replace) > 0 {
			t.Errorf("%s/go.mod: replace %s: consumers ignore it; require a published version (go.work joins the modules here)", dir, mf.Replace[0].Old.Path)
		}
		if mf.Go == nil || mf.Go.Version != "1.25.0" {
			got := "missing"
			if mf.Go != nil {
				got = mf.Go.Version
			}
			t.Errorf("%s/go.mod: go line %s, want 1.25.0 (the README promises Go 1.25)", dir, got)
		}
		for _, r := range mf.Require {
			if r.Mod.Path != rootPath && !strings.HasPrefix(r.Mod.Path, rootPath+"/") {
				continue
			}
			v := r.Mod.Version
			if module.IsPseudoVersion(v) || !strings.HasPrefix(v, "v") {
				t.Errorf("%s/go.mod: requires %s %s, not a version that can be tagged", dir, r.Mod.Path, v)
			}
			if version != "" && v != version {
				t.Errorf("%s/go.mod: requires %s %s, another module requires %s: release them together", dir, r.Mod.Path, v, version)
			}
			version = v
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	if version == "" {
		t.Fatal("no module requires another module of this repository")
	}
	return version
}

// publish writes module path at version, made from dir, to the file proxy.
func publish(t *testing.T, proxy, dir, path, version string) {
	t.Helper()
	ep, err := module.EscapePath(path)
	if err != nil {
		t.Fatal(err)
	}
	at := filepath.Join(proxy, ep, "@v")
	if err := os.MkdirAll(at, 0o755); err != nil {
		t.Fatal(err)
	}
	var z bytes.Buffer
	if err := zip.CreateFromDir(&z, module.Version{Path: path, Version: version}, dir); err != nil {
		t.Fatalf("zip %s: %v", path, err)
	}
	mod, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	info := fmt.Sprintf(`{"Version":%q,"Time":%q}`, version, time.Now().UTC().Format(time.RFC3339))
	write(t, filepath.Join(at, "list"), version+"\n")
	write(t, filepath.Join(at, version+".info"), info)
	write(t, filepath.Join(at, version+".mod"), string(mod))
	write(t, filepath.Join(at, version+".zip"), z.String())
}

// goEnv runs the go command as a user outside the repository does, with
// a module cache of its own and no network.
type goEnv struct {
	env      []string
	modcache string
	bin      string
}

func newGoEnv(t *testing.T, proxy string) *goEnv {
	t.Helper()
	cache := strings.TrimSpace(run(t, "", os.Environ(), "go", "env", "GOMODCACHE", "GOCACHE"))
	fields := strings.Split(cache, "\n")
	if len(fields) != 2 {
		t.Fatalf("go env GOMODCACHE GOCACHE: %q", cache)
	}
	g := &goEnv{modcache: t.TempDir(), bin: t.TempDir()}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "GO") || strings.HasPrefix(k, "PG") || k == "DATABASE_URL" {
			continue
		}
		g.env = append(g.env, kv)
	}
	g.env = append(g.env,
		// Ours from the proxy just made, the others from this machine's
		// module cache, nothing from the network.
		"GOPROXY=file://"+filepath.ToSlash(proxy)+",file://"+filepath.ToSlash(filepath.Join(fields[0], "cache", "download"))+",off",
		// -trimpath: builds do not depend on where the module cache is,
		// so the build cache serves them from one run to the next.
		"GOFLAGS=-mod=mod -modcacherw -trimpath",
		"GOWORK=off",
		"GOSUMDB=off",
		"GONOSUMDB="+rootPath,
		"GOTOOLCHAIN=local",
		"GOENV=off",
		"GOMODCACHE="+g.modcache,
		"GOCACHE="+fields[1],
		"GOBIN="+g.bin,
	)
	return g
}

// run runs a command of the consumer in dir and returns its output.
func (g *goEnv) run(t *testing.T, dir string, name string, args ...string) string {
	t.Helper()
	return run(t, dir, g.env, name, args...)
}

// commandTimeout bounds each command, the first build of pglock included.
const commandTimeout = 3 * time.Minute

func run(t *testing.T, dir string, env []string, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = env
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s (in %s): %v (bound %v)\n%s", name, strings.Join(args, " "), dir, err, commandTimeout, out.String())
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Logf("%s %s: %v", filepath.Base(name), strings.Join(args, " "), d.Round(time.Second))
	}
	return out.String()
}

// graphModules returns the modules (path@version) in go mod graph's output.
func graphModules(graph string) []string {
	seen := map[string]bool{}
	for _, f := range strings.Fields(graph) {
		seen[f] = true
	}
	mods := make([]string, 0, len(seen))
	for m := range seen {
		mods = append(mods, m)
	}
	sort.Strings(mods)
	return mods
}

// downloaded returns the module paths with anything (a .mod file at least)
// in a module cache's download directory.
func downloaded(t *testing.T, dir string) []string {
	t.Helper()
	var mods []string
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "@v" {
			rel, _ := filepath.Rel(dir, filepath.Dir(path))
			p, err := module.UnescapePath(filepath.ToSlash(rel))
			if err != nil {
				p = rel
			}
			mods = append(mods, p)
			return filepath.SkipDir
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return mods
}

// isForbidden returns the forbidden substring in module m, or "".
func isForbidden(m string) string {
	for _, f := range forbidden {
		if strings.Contains(m, f) {
			return f
		}
	}
	return ""
}

func write(t *testing.T, name, data string) {
	t.Helper()
	if err := os.WriteFile(name, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}
