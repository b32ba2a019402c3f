//! AF_XDP transport (under construction): raw Ethernet frames with EtherType `0x88B5` between two
//! hosts, one channel frame per Ethernet frame.
