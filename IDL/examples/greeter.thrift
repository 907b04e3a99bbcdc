// A second, small Thrift service of Apus, served by Examples/greeter-python-thrift (compact protocol). Its method
// names do not overlap with Calculator's, so both can be reached on one gateway port by plain method name as well
// as multiplexed ("Greeter:greet").
//
// Regenerate the Python code with Scripts/gen-thrift.

namespace py greeter

service Greeter {
  // "<GREETING>, <name>!" (GREETING from the function's environment, default "Hello").
  string greet(1: string name),
}
