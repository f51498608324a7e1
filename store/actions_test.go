package store_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/fleetmq/fleetmq/store"
)

// Every Act* constant is in AuditActions, which the dashboard's audit
// filter offers: a new action missing there could not be filtered on.
func TestAuditActionsComplete(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "types.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var consts []string
	ast.Inspect(f, func(n ast.Node) bool {
		vs, ok := n.(*ast.ValueSpec)
		if !ok || len(vs.Names) != 1 || !strings.HasPrefix(vs.Names[0].Name, "Act") || len(vs.Values) != 1 {
			return true
		}
		if lit, ok := vs.Values[0].(*ast.BasicLit); ok && lit.Kind == token.STRING {
			v, _ := strconv.Unquote(lit.Value)
			consts = append(consts, v)
		}
		return true
	})
	if len(consts) < 10 {
		t.Fatalf("found %d Act constants in types.go: %v", len(consts), consts)
	}
	for _, c := range consts {
		if !slices.Contains(store.AuditActions, c) {
			t.Errorf("%q is not in AuditActions", c)
		}
	}
	if len(store.AuditActions) != len(consts) {
		t.Errorf("AuditActions has %d entries, types.go %d constants", len(store.AuditActions), len(consts))
	}
}
