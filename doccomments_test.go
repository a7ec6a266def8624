package advisory

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
)

// No doc comment that pkg.go.dev shows (the package's, and those of
// exported identifiers and of the exported fields and methods of exported
// types) names an unexported identifier of the package: it would be a dead
// link, and an implementation detail in the contract. An identifier counts
// when it reads as code, not as an English word: it has an upper-case
// letter, a digit or an underscore (beginLocked), or is followed by "(".
func TestExportedDocsNameNoUnexported(t *testing.T) {
	files := packageFiles(t, parser.ParseComments)

	unexported := map[string]bool{}
	addName := func(id *ast.Ident) {
		if id != nil && id.Name != "_" && !id.IsExported() {
			unexported[id.Name] = true
		}
	}
	addFields := func(fl *ast.FieldList) {
		if fl == nil {
			return
		}
		for _, f := range fl.List {
			for _, n := range f.Names {
				addName(n)
			}
		}
	}
	// docs are the doc comments pkg.go.dev shows, by what they document.
	docs := map[string]*ast.CommentGroup{}
	for _, f := range files {
		if f.Doc != nil {
			docs["package advisory"] = f.Doc
		}
		for _, d := range f.Decls {
			switch d := d.(type) {
			case *ast.FuncDecl:
				addName(d.Name)
				switch {
				case !d.Name.IsExported():
				case d.Recv == nil:
					docs[d.Name.Name] = d.Doc
				case recvName(d.Recv).IsExported():
					docs[recvName(d.Recv).Name+"."+d.Name.Name] = d.Doc
				}
			case *ast.GenDecl:
				for _, s := range d.Specs {
					switch s := s.(type) {
					case *ast.TypeSpec:
						addName(s.Name)
						st, _ := s.Type.(*ast.StructType)
						it, _ := s.Type.(*ast.InterfaceType)
						if st != nil {
							addFields(st.Fields)
						}
						if !s.Name.IsExported() {
							continue
						}
						docs[s.Name.Name] = firstDoc(s.Doc, d.Doc)
						var members *ast.FieldList
						switch {
						case st != nil:
							members = st.Fields
						case it != nil:
							members = it.Methods
						}
						if members != nil {
							for _, f := range members.List {
								for _, n := range f.Names {
									if n.IsExported() {
										docs[s.Name.Name+"."+n.Name] = firstDoc(f.Doc, f.Comment)
									}
								}
							}
						}
					case *ast.ValueSpec:
						for _, n := range s.Names {
							addName(n)
							if n.IsExported() {
								docs[n.Name] = firstDoc(s.Doc, d.Doc)
								if s.Comment != nil {
									docs[n.Name+" (line comment)"] = s.Comment
								}
							}
						}
					}
				}
			}
		}
	}

	if len(docs) < 50 || len(unexported) < 50 {
		t.Fatalf("read %d doc comments and %d unexported identifiers: the parse missed the package", len(docs), len(unexported))
	}
	word := regexp.MustCompile(`[A-Za-z_][A-Za-z0-9_]*(\()?`)
	codeLike := regexp.MustCompile(`[A-Z0-9_]`)
	var found []string
	for what, doc := range docs {
		if doc == nil {
			continue
		}
		text := doc.Text()
		for _, m := range word.FindAllStringSubmatchIndex(text, -1) {
			name := text[m[0]:m[1]]
			call := strings.HasSuffix(name, "(")
			name = strings.TrimSuffix(name, "(")
			if m[0] > 0 && text[m[0]-1] == '.' {
				continue // a qualified name: pgx.Tx, s.Lock, a file name
			}
			if unexported[name] && (call || codeLike.MatchString(name)) {
				found = append(found, what+": "+name)
			}
		}
	}
	sort.Strings(found)
	for _, f := range found {
		t.Errorf("the doc comment of %s names the unexported identifier", f)
	}
}

// packageFiles parses the package's source files (every build variant, not
// the tests).
func packageFiles(t *testing.T, mode parser.Mode) []*ast.File {
	t.Helper()
	names, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	var files []*ast.File
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, mode)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	return files
}

// recvName is the name of a method's receiver type.
func recvName(recv *ast.FieldList) *ast.Ident {
	x := recv.List[0].Type
	if s, ok := x.(*ast.StarExpr); ok {
		x = s.X
	}
	if ix, ok := x.(*ast.IndexExpr); ok {
		x = ix.X
	}
	return x.(*ast.Ident)
}

func firstDoc(docs ...*ast.CommentGroup) *ast.CommentGroup {
	for _, d := range docs {
		if d != nil {
			return d
		}
	}
	return nil
}
