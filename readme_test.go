package advisory_test

import (
	"bytes"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// The README's quick start is the package example, so that it cannot rot:
// its main's body is Example's body (example_test.go) without the Output
// comment, and it imports exactly the packages that body uses.
func TestReadmeQuickStart(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	block := goBlockAfter(readme, "## Quick start")
	if block == nil {
		t.Fatal("README.md: no ```go block after \"## Quick start\"")
	}
	quick, quickFile := parseFunc(t, "README.md quick start", block, "main")
	example, exampleFile := parseFunc(t, "example_test.go", mustRead(t, "example_test.go"), "Example")
	exampleBody, _, _ := strings.Cut(example, "\t// Output:")
	if quick != exampleBody {
		t.Errorf("README.md's quick start main() is not example_test.go's Example(); copy the example over.\n"+
			"README:\n%s\nExample:\n%s", quick, exampleBody)
	}
	imported := importPaths(quickFile)
	used := usedImports(exampleFile, "Example")
	if !slices.Equal(imported, used) {
		t.Errorf("README.md's quick start imports %q; Example uses %q", imported, used)
	}
}

// goBlockAfter returns the first ```go block after the line heading.
func goBlockAfter(md []byte, heading string) []byte {
	_, rest, ok := bytes.Cut(md, []byte("\n"+heading+"\n"))
	if !ok {
		return nil
	}
	m := regexp.MustCompile("(?s)```go\n(.*?)```").FindSubmatch(rest)
	if m == nil {
		return nil
	}
	return m[1]
}

func mustRead(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// parseFunc parses src as a Go file and returns the text of function
// name's body between its braces, and the file.
func parseFunc(t *testing.T, what string, src []byte, name string) (string, *ast.File) {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, what, src, parser.ParseComments)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	for _, d := range f.Decls {
		if fn, ok := d.(*ast.FuncDecl); ok && fn.Name.Name == name && fn.Recv == nil {
			from, to := fset.Position(fn.Body.Lbrace).Offset+1, fset.Position(fn.Body.Rbrace).Offset
			return string(src[from:to]), f
		}
	}
	t.Fatalf("%s: no func %s", what, name)
	return "", nil
}

// importPaths returns the sorted import paths of f.
func importPaths(f *ast.File) []string {
	var paths []string
	for _, imp := range f.Imports {
		p, _ := strconv.Unquote(imp.Path.Value)
		paths = append(paths, p)
	}
	slices.Sort(paths)
	return paths
}

// usedImports returns the sorted import paths of f that function name
// refers to. Package names are taken from the path (the element before a
// /vN suffix), which holds for the imports of example_test.go.
func usedImports(f *ast.File, name string) []string {
	byName := map[string]string{}
	for _, p := range importPaths(f) {
		n := path.Base(p)
		if regexp.MustCompile(`^v[0-9]+$`).MatchString(n) {
			n = path.Base(path.Dir(p))
		}
		byName[n] = p
	}
	var used []string
	for _, d := range f.Decls {
		fn, ok := d.(*ast.FuncDecl)
		if !ok || fn.Name.Name != name {
			continue
		}
		ast.Inspect(fn, func(n ast.Node) bool {
			if sel, ok := n.(*ast.SelectorExpr); ok {
				if id, ok := sel.X.(*ast.Ident); ok && byName[id.Name] != "" && !slices.Contains(used, byName[id.Name]) {
					used = append(used, byName[id.Name])
				}
			}
			return true
		})
	}
	slices.Sort(used)
	return used
}
