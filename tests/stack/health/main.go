// Command health answers what GitOps tools would say about an object: the
// kstatus status (what Flux and kstatus-based tools compute) and the result
// of an Argo CD Lua health script, run with gopher-lua as Argo CD runs it.
//
//	health kstatus < object.json
//	health lua check.lua < object.json
//
// Each prints one JSON object: {"status": "...", "message": "..."}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "health:", err)
		os.Exit(1)
	}
}

func run(args []string, in io.Reader, out io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: health kstatus | health lua <script>")
	}
	raw, err := io.ReadAll(in)
	if err != nil {
		return err
	}
	var obj map[string]interface{}
	// As the API machinery decodes: whole numbers are int64, which kstatus requires.
	if err := utiljson.Unmarshal(raw, &obj); err != nil {
		return fmt.Errorf("object: %w", err)
	}
	var v verdict
	switch {
	case args[0] == "kstatus" && len(args) == 1:
		res, err := status.Compute(&unstructured.Unstructured{Object: obj})
		if err != nil {
			return err
		}
		v = verdict{Status: res.Status.String(), Message: res.Message}
	case args[0] == "lua" && len(args) == 2:
		script, err := os.ReadFile(args[1])
		if err != nil {
			return err
		}
		v, err = runLua(string(script), obj)
		if err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown command %q", args)
	}
	return json.NewEncoder(out).Encode(v)
}

// runLua evaluates a health script as Argo CD does: the object is the
// global `obj`, only the safe standard libraries are open, and the script
// returns a table with `status` and `message`.
func runLua(script string, obj map[string]interface{}) (verdict, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		fn   lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.StringLibName, lua.OpenString},
		{lua.MathLibName, lua.OpenMath},
	} {
		l.Push(l.NewFunction(lib.fn))
		l.Push(lua.LString(lib.name))
		l.Call(1, 0)
	}
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(script); err != nil {
		return verdict{}, err
	}
	ret, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return verdict{}, fmt.Errorf("the script returned %s, not a table", l.Get(-1).Type())
	}
	return verdict{
		Status:  lua.LVAsString(ret.RawGetString("status")),
		Message: lua.LVAsString(ret.RawGetString("message")),
	}, nil
}

// toLua converts decoded JSON into Lua values: objects and arrays become
// tables (arrays 1-indexed), as Argo CD's conversion does.
func toLua(l *lua.LState, v interface{}) lua.LValue {
	switch v := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []interface{}:
		t := l.NewTable()
		for _, item := range v {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]interface{}:
		t := l.NewTable()
		for k, item := range v {
			t.RawSetString(k, toLua(l, item))
		}
		return t
	default:
		return lua.LString(fmt.Sprint(v))
	}
}
