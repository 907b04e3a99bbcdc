// The example Thrift service of Apus. Served by Examples/calculator-python-thrift; the integration tests call it
// through the gateway's Thrift port with every transport (framed, buffered, header) and protocol (binary, compact).
//
// It covers what a Thrift edge must carry without looking inside: every base type as a top-level argument
// (`describe`) and inside a struct (`roundtrip`), containers (list, set, map, nested), nested structs, a declared
// exception, an undeclared failure, a oneway call, a slow call (deadlines) and large binary payloads (`echo`).
//
// Regenerate the Python code with Scripts/gen-thrift (Debian's thrift-compiler 0.17).

namespace py calculator

enum Operation {
  ADD = 1,
  SUBTRACT = 2,
  MULTIPLY = 3,
  DIVIDE = 4,
}

// One arithmetic step for `calculate`.
struct Work {
  1: i32 num1 = 0,
  2: i32 num2,
  3: Operation op,
  4: optional string comment,
}

struct Point {
  1: double x,
  2: double y,
}

// Structs inside structs inside containers.
struct Shape {
  1: string name,
  2: list<Point> points,
  3: map<string, Point> anchors,
  4: optional Point center,
}

// Every base type and container kind in one struct; `roundtrip` sends it back unchanged.
struct AllTypes {
  1: bool flag,
  2: i8 tiny,
  3: i16 small,
  4: i32 medium,
  5: i64 large,
  6: double real,
  7: string text,
  8: binary blob,
  9: list<i32> numbers,
  10: set<string> tags,
  11: map<string, i64> counts,
  12: Shape shape,
  13: list<Shape> shapes,
  14: map<i32, list<string>> index,
  15: set<i64> ids,
  16: map<string, map<string, bool>> matrix,
  17: list<list<i16>> grid,
  18: optional string note,
  19: Operation op,
}

exception InvalidOperation {
  1: i32 what,
  2: string why,
}

service Calculator {
  // Does nothing; the smallest call there is.
  void ping(),

  i32 add(1: i32 num1, 2: i32 num2),

  // Throws InvalidOperation {what: op, why: "cannot divide by 0"} for a division by zero, and
  // InvalidOperation {what: op, why: "unknown operation"} for an operation it does not know.
  i32 calculate(1: i32 logid, 2: Work w) throws (1: InvalidOperation ouch),

  // Every base type as a top-level argument; returns them as text:
  // "flag=<True|False> tiny=<n> small=<n> medium=<n> large=<n> real=<repr> text=<text> blob=<hex>".
  string describe(1: bool flag, 2: i8 tiny, 3: i16 small, 4: i32 medium, 5: i64 large, 6: double real,
                  7: string text, 8: binary blob),

  // Sends the value back unchanged.
  AllTypes roundtrip(1: AllTypes value),

  // Containers as arguments and results.
  i64 sum(1: list<i64> values),
  set<string> unique(1: list<string> words),
  map<string, i32> histogram(1: list<string> words),

  // Returns `data` unchanged (large payloads).
  binary echo(1: binary data),

  // Oneway: no reply. The function prints "zap <id>" (flushed) so the call can be observed in the logs.
  oneway void zap(1: i32 id),

  // Sleeps `ms` milliseconds, prints "slow <ms> done" and returns `ms` (deadline tests).
  i32 slow(1: i32 ms),

  // "<APUS_FUNCTION>/<APUS_INSTANCE>" of the instance that served the call.
  string whoami(),

  // Raises an exception the IDL does not declare: the server answers TApplicationException INTERNAL_ERROR.
  void crash(1: string message),
}
